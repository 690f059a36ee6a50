"""The guest side of networking: rebuild each container interface (found by its
MAC) with its name, MTU, addresses and routes.

Netlink messages are pyroute2's, sent on a plain netlink socket: importing
pyroute2's IPRoute costs 3-5 s under TCG (asyncio and the rest), its message
classes well under one."""
import os
import socket
import struct

from dkvm.pyroute2_light import light_pyroute2

NETLINK_ROUTE = 0
IFF_UP = 0x1
IFA_F_NODAD = 0x02
RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, MAIN_TABLE = 4, 0, 1, 254


class Rtnl:
    """Requests with acknowledgement on a route netlink socket."""

    def __init__(self):
        light_pyroute2()
        from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
        from pyroute2.netlink.rtnl import RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
        from pyroute2.netlink.rtnl.rtmsg import rtmsg
        self.msgs = {"link": (ifinfmsg, RTM_NEWLINK), "addr": (ifaddrmsg, RTM_NEWADDR),
                     "route": (rtmsg, RTM_NEWROUTE)}
        self.flags = NLM_F_REQUEST | NLM_F_ACK
        self.create = NLM_F_CREATE | NLM_F_EXCL
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def request(self, kind, fields, attrs, create=False):
        cls, msg_type = self.msgs[kind]
        msg = cls()
        for key, value in fields.items():
            msg[key] = value
        msg["attrs"] = attrs
        self.seq += 1
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = self.flags | (self.create if create else 0)
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
                attrs = [["RTA_OIF", index]]
                if route["dst_len"]:
                    attrs.append(["RTA_DST", route["dst"]])
                if route["gateway"]:
                    attrs.append(["RTA_GATEWAY", route["gateway"]])
                if route.get("metric"):
                    attrs.append(["RTA_PRIORITY", route["metric"]])
                rtnl.request("route", {"family": route["family"], "dst_len": route["dst_len"],
                                       "table": MAIN_TABLE, "proto": RTPROT_STATIC,
                                       "scope": RT_SCOPE_UNIVERSE, "type": RTN_UNICAST},
                             attrs, create=True)
    finally:
        rtnl.close()
