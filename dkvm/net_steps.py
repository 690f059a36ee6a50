"""The guest's network set-up as steps: netlink requests encoded here, on the container
side, with pyroute2's message classes, and sysctl writes.

The guest only finds each NIC's index by its MAC, writes it into the requests and
sends them (net_guest): importing pyroute2's message classes would cost the guest
most of a second of its boot under TCG.

A step is {"sysctl": {name: value}}, {"running": interface name, "ipv6": bool} (wait
for it), or
{"kind": "link" | "addr" | "route", "mac", "netlink": hex, "what": for errors,
"ignore": [errno], "optional": skipped when no NIC has that MAC}. Requests carry
index 0 (and RTA_OIF 0) for the guest to fill in.
"""
from errno import ESRCH

from dkvm.net_container import IFF_UP, MAIN_TABLE, RT_SCOPE_UNIVERSE, RTN_UNICAST, RTPROT_STATIC
from dkvm.pyroute2_light import light_pyroute2

IFA_F_NODAD = 0x02


def interface_steps(interfaces):
    """Give each guest NIC its container interface's name, MTU, IPv6 switch, state,
    addresses, then routes. Names go through temporary ones first, so that swapping
    names between NICs cannot clash."""
    steps = [link_step(iface, {}, [["IFLA_IFNAME", f"dkvmnet{number}"]], "rename")
             for number, iface in enumerate(interfaces)]
    for iface in interfaces:
        name = iface["name"]
        steps.append(link_step(iface, {}, [["IFLA_IFNAME", name], ["IFLA_MTU", iface["mtu"]]],
                               f"rename to {name}"))
        steps.append({"sysctl": {f"net.ipv6.conf.{name}.disable_ipv6":
                                 "0" if iface.get("ipv6") else "1"}})
        steps.append(link_step(iface, {"flags": IFF_UP, "change": IFF_UP}, [], f"set {name} up"))
        for family, address, prefixlen, broadcast in iface["addresses"]:
            attrs = [["IFA_LOCAL", address], ["IFA_ADDRESS", address]]
            if broadcast:
                attrs.append(["IFA_BROADCAST", broadcast])
            steps.append(step("addr", iface["mac"], f"address {address}/{prefixlen} on {name}",
                              encode("addr", {"family": family, "prefixlen": prefixlen,
                                              "index": 0, "flags": IFA_F_NODAD}, attrs,
                                     create=True)))
    for iface in interfaces:
        steps += [route_step(iface["mac"], route, add=True) for route in iface["routes"]]
    # the kernel marks a NIC running (and IPv6 gives it its link-local address) up to
    # a second after its carrier comes; a veth has both when runc starts the workload
    steps += [{"running": iface["name"], "ipv6": bool(iface.get("ipv6"))}
              for iface in interfaces]
    return steps


def link_step(iface, fields, attrs, what):
    return step("link", iface["mac"], f"{what} ({iface['name']})",
                encode("link", {"index": 0, **fields}, attrs))


def route_step(mac, route, add, optional=False):
    """Add (or replace) or delete one route out of the NIC with this MAC."""
    attrs = [["RTA_OIF", 0]]
    if route["dst_len"]:
        attrs.append(["RTA_DST", route["dst"]])
    if route["gateway"]:
        attrs.append(["RTA_GATEWAY", route["gateway"]])
    if route.get("metric"):
        attrs.append(["RTA_PRIORITY", route["metric"]])
    dst = f"{route['dst']}/{route['dst_len']}" if route["dst_len"] else "default"
    via = f" via {route['gateway']}" if route["gateway"] else ""
    fields = {"family": route["family"], "dst_len": route["dst_len"], "table": MAIN_TABLE,
              "proto": RTPROT_STATIC, "scope": RT_SCOPE_UNIVERSE, "type": RTN_UNICAST}
    return step("route", mac,
                f"{'route' if add else 'removing route'} {dst}{via}",
                encode("route" if add else "route_del", fields, attrs, replace=add),
                ignore=[] if add else [ESRCH], optional=optional)


def step(kind, mac, what, netlink, ignore=(), optional=False):
    return {"kind": kind, "mac": mac.lower(), "what": what, "netlink": netlink,
            "ignore": list(ignore), "optional": optional}


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
