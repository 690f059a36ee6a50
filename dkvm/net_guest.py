"""The guest side of networking: rebuild each container interface (found by its
MAC) with its name, MTU, addresses and routes, at boot and when Docker connects,
disconnects or re-routes networks of the running container (net_hotplug).

Netlink messages are pyroute2's, sent on a plain netlink socket: importing
pyroute2's IPRoute costs 3-5 s under TCG (asyncio and the rest), its message
classes well under one."""
import errno
import os
import socket
import struct
import time

from dkvm import guestos
from dkvm.pyroute2_light import light_pyroute2

NETLINK_ROUTE = 0
IFF_UP = 0x1
IFA_F_NODAD = 0x02
RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, MAIN_TABLE = 4, 0, 1, 254
NIC_WAIT = 30           # a hot-plugged NIC showing up in the guest (ACPI, then the driver)


class Rtnl:
    """Requests with acknowledgement on a route netlink socket."""

    def __init__(self):
        light_pyroute2()
        from pyroute2.netlink import (NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
                                      NLM_F_REQUEST)
        from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
        from pyroute2.netlink.rtnl.rtmsg import rtmsg
        self.msgs = {"link": (ifinfmsg, RTM_NEWLINK), "addr": (ifaddrmsg, RTM_NEWADDR),
                     "route": (rtmsg, RTM_NEWROUTE), "route_del": (rtmsg, RTM_DELROUTE)}
        self.flags = NLM_F_REQUEST | NLM_F_ACK
        self.create = NLM_F_CREATE | NLM_F_EXCL
        self.replace = NLM_F_CREATE | NLM_F_REPLACE
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def request(self, kind, fields, attrs, create=False, replace=False):
        cls, msg_type = self.msgs[kind]
        msg = cls()
        for key, value in fields.items():
            msg[key] = value
        msg["attrs"] = attrs
        self.seq += 1
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = (self.flags | (self.create if create else 0)
                                  | (self.replace if replace else 0))
        msg["header"]["sequence_number"] = self.seq
        msg.encode()
        self.sock.send(msg.data)
        self.wait_ack(kind, attrs)

    def wait_ack(self, kind, attrs):
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset < len(data):
                length, msg_type, _, seq, _ = struct.unpack_from("IHHII", data, offset)
                if msg_type == 2 and seq == self.seq:           # NLMSG_ERROR (0: the ack)
                    error = -struct.unpack_from("i", data, offset + 16)[0]
                    if error:
                        raise OSError(error, f"netlink {kind} {attrs}: {os.strerror(error)}")
                    return
                offset += (length + 3) & ~3

    def close(self):
        self.sock.close()


def links_by_mac():
    found = {}
    for name in os.listdir("/sys/class/net"):
        with open(f"/sys/class/net/{name}/address") as f:
            mac = f.read().strip()
        with open(f"/sys/class/net/{name}/ifindex") as f:
            found[mac] = int(f.read())
    return found


def configure(interfaces):
    """Give each guest NIC (matched by MAC) the container interface's identity."""
    if not interfaces:
        return
    rtnl = Rtnl()
    try:
        by_mac = links_by_mac()
        indexes = []
        for number, iface in enumerate(interfaces):
            index = by_mac.get(iface["mac"].lower())
            if index is None:
                raise RuntimeError(f"no guest NIC with MAC {iface['mac']} for {iface['name']}")
            indexes.append(index)
            # a temporary name first, so that swapping names between NICs cannot clash
            rtnl.request("link", {"index": index}, [["IFLA_IFNAME", f"dkvmnet{number}"]])
        for index, iface in zip(indexes, interfaces):
            rtnl.request("link", {"index": index}, [["IFLA_IFNAME", iface["name"]],
                                                    ["IFLA_MTU", iface["mtu"]]])
            with open(f"/proc/sys/net/ipv6/conf/{iface['name']}/disable_ipv6", "w") as f:
                f.write("0" if iface.get("ipv6") else "1")
            rtnl.request("link", {"index": index, "flags": IFF_UP, "change": IFF_UP}, [])
            for family, address, prefixlen, broadcast in iface["addresses"]:
                attrs = [["IFA_LOCAL", address], ["IFA_ADDRESS", address]]
                if broadcast:
                    attrs.append(["IFA_BROADCAST", broadcast])
                rtnl.request("addr", {"family": family, "prefixlen": prefixlen, "index": index,
                                      "flags": IFA_F_NODAD}, attrs, create=True)
        for index, iface in zip(indexes, interfaces):
            for route in iface["routes"]:
                route_request(rtnl, "route", index, route, create=True)
    finally:
        rtnl.close()


def route_request(rtnl, kind, index, route, **flags):
    attrs = [["RTA_OIF", index]]
    if route["dst_len"]:
        attrs.append(["RTA_DST", route["dst"]])
    if route["gateway"]:
        attrs.append(["RTA_GATEWAY", route["gateway"]])
    if route.get("metric"):
        attrs.append(["RTA_PRIORITY", route["metric"]])
    rtnl.request(kind, {"family": route["family"], "dst_len": route["dst_len"],
                        "table": MAIN_TABLE, "proto": RTPROT_STATIC, "scope": RT_SCOPE_UNIVERSE,
                        "type": RTN_UNICAST}, attrs, **flags)


class PendingChanges:
    """Network changes wait, in order, for their hot-plugged NICs to show up; init's
    loop polls. (Not a thread: init has unshared its PID namespace for the workload,
    after which the kernel refuses it new threads.)"""

    POLL = 0.05

    def __init__(self):
        self.waiting = []               # [(change, deadline)]

    def add(self, change):
        self.waiting.append((change, time.monotonic() + NIC_WAIT))

    def timeout(self, idle):
        return min(idle, self.POLL) if self.waiting else idle

    def apply_ready(self):
        """Apply the changes whose NICs are there; the errors of those that failed."""
        errors = []
        while self.waiting:
            change, deadline = self.waiting[0]
            missing = {iface["mac"].lower() for iface in change["add"]} - set(links_by_mac())
            if missing and time.monotonic() < deadline:
                break
            self.waiting.pop(0)
            try:
                if missing:
                    raise RuntimeError(f"hot-plugged NICs {sorted(missing)} did not appear "
                                       f"in the guest within {NIC_WAIT}s")
                apply_change(change)
            except Exception as err:
                errors.append(str(err))
        return errors


def apply_change(change):
    """Follow Docker: set the sysctls it changed, configure the hot-plugged NICs, move the routes as Docker moved
    them (a NIC unplugged took its own routes along), and forget cached copies of the
    files Docker rewrote (virtiofs caches without expiry; this drops unused inodes)."""
    guestos.write_sysctls(change["sysctl"])
    configure(change["add"])
    if change.get("files_changed"):
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
    rtnl = Rtnl()
    try:
        for kind, routes in (("route_del", change["routes_del"]), ("route", change["routes_add"])):
            for route in routes:
                try:
                    with open(f"/sys/class/net/{route['dev']}/ifindex") as f:
                        index = int(f.read())
                except OSError:
                    continue            # its NIC is gone, and the route with it
                try:
                    route_request(rtnl, kind, index, route, replace=kind == "route")
                except OSError as err:
                    if err.errno != errno.ESRCH:
                        raise
    finally:
        rtnl.close()
