"""The guest's network set-up as steps: netlink requests encoded here, on the container
side, with pyroute2's message classes, and sysctl writes.

The guest only finds each NIC's index by its MAC, writes it into the requests and
sends them (guest.network): importing pyroute2's message classes would cost the guest
most of a second of its boot under TCG.

Each step is a schema.NetStep. Requests carry index 0 (and RTA_OIF 0) for the guest
to fill in.
"""
from errno import ESRCH

from dkvm.container.net.plumbing import MAIN_TABLE, RT_SCOPE_UNIVERSE, RTN_UNICAST, RTPROT_STATIC
from dkvm.container.net.pyroute2_light import light_pyroute2
from dkvm.container.net.taps import IFF_UP
from dkvm.schema import NetStep

IFA_F_NODAD = 0x02


def interface_steps(interfaces):
    """Give each guest NIC its container interface's name, MTU, IPv6 switch, state,
    addresses, then routes. Names go through temporary ones first, so that swapping
    names between NICs cannot clash."""
    steps = [link_step(iface, {}, [["IFLA_IFNAME", f"dkvmnet{number}"]], "rename")
             for number, iface in enumerate(interfaces)]
    for iface in interfaces:
        name = iface.name
        steps.append(link_step(iface, {}, [["IFLA_IFNAME", name], ["IFLA_MTU", iface.mtu]],
                               f"rename to {name}"))
        steps.append(sysctl_step({f"net.ipv6.conf.{name}.disable_ipv6":
                                  "0" if iface.ipv6 else "1"}))
        steps.append(link_step(iface, {"flags": IFF_UP, "change": IFF_UP}, [], f"set {name} up"))
        for addr in iface.addresses:
            attrs = [["IFA_LOCAL", addr.address], ["IFA_ADDRESS", addr.address]]
            if addr.broadcast:
                attrs.append(["IFA_BROADCAST", addr.broadcast])
            steps.append(netlink_step(
                "addr", iface.mac, f"address {addr.address}/{addr.prefixlen} on {name}",
                encode("addr", {"family": addr.family, "prefixlen": addr.prefixlen,
                                "index": 0, "flags": IFA_F_NODAD}, attrs, create=True)))
    for iface in interfaces:
        steps += [route_step(iface.mac, route, add=True) for route in iface.routes]
    # the kernel marks a NIC running (and IPv6 gives it its link-local address) up to
    # a second after its carrier comes; a veth has both when runc starts the workload
    steps += [NetStep(kind="running", name=iface.name, ipv6=iface.ipv6) for iface in interfaces]
    return steps


def sysctl_step(values):
    return NetStep(kind="sysctl", sysctl=dict(values))


def link_step(iface, fields, attrs, what):
    return netlink_step("link", iface.mac, f"{what} ({iface.name})",
                        encode("link", {"index": 0, **fields}, attrs))


def route_step(mac, route, add, optional=False):
    """Add (or replace) or delete one route out of the NIC with this MAC."""
    attrs = [["RTA_OIF", 0]]
    if route.dst_len:
        attrs.append(["RTA_DST", route.dst])
    if route.gateway:
        attrs.append(["RTA_GATEWAY", route.gateway])
    if route.metric:
        attrs.append(["RTA_PRIORITY", route.metric])
    dst = f"{route.dst}/{route.dst_len}" if route.dst_len else "default"
    via = f" via {route.gateway}" if route.gateway else ""
    fields = {"family": route.family, "dst_len": route.dst_len, "table": MAIN_TABLE,
              "proto": RTPROT_STATIC, "scope": RT_SCOPE_UNIVERSE, "type": RTN_UNICAST}
    return netlink_step("route", mac,
                        f"{'route' if add else 'removing route'} {dst}{via}",
                        encode("route" if add else "route_del", fields, attrs, replace=add),
                        ignore=[] if add else [ESRCH], optional=optional)


def netlink_step(kind, mac, what, netlink, ignore=(), optional=False):
    return NetStep(kind=kind, mac=mac.lower(), what=what, netlink=netlink,
                   ignore=list(ignore), optional=optional)


def encode(kind, fields, attrs, create=False, replace=False):
    light_pyroute2()
    from pyroute2.netlink import (NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
                                  NLM_F_REQUEST)
    from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg
    cls, msg_type = {"link": (ifinfmsg, RTM_NEWLINK), "addr": (ifaddrmsg, RTM_NEWADDR),
                     "route": (rtmsg, RTM_NEWROUTE), "route_del": (rtmsg, RTM_DELROUTE)}[kind]
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = (NLM_F_REQUEST | NLM_F_ACK
                              | (NLM_F_CREATE | NLM_F_EXCL if create else 0)
                              | (NLM_F_CREATE | NLM_F_REPLACE if replace else 0))
    msg.encode()
    return bytes(msg.data).hex()
