"""`docker network connect` and `disconnect` on a running container, in the VM.

libnetwork never calls the runtime for these: it moves a veth into (or out of) the
container's namespace and programs its addresses and routes there. So the entrypoint
watches that namespace and follows. A new interface is handed over like the boot-time
ones and hot-plugged into the VM as a virtio NIC over QMP; a vanished one is unplugged;
route changes (Docker moves the default gateway between networks) and the IPv6
sysctls Docker sets are repeated in the guest. The guest learns all of it from one
NET frame per change. (Docker's rewrites of /etc/hosts reach the guest through
virtiofs, like any file changed from outside: virtiofsd_argv.)
"""
import select
import socket
import struct
import threading

from dkvm import wire
from dkvm.container.net.plumbing import (describe, docker_routes, guest_links, hand_over,
                                         ipv6_sysctls, open_iproute)
from dkvm.container.net.steps import interface_steps, route_step, sysctl_step
from dkvm.container.net.taps import IFF_UP, create_tap, tap_name
from dkvm.container.vmm import netdev_id, nic_id, nic_options
from dkvm.log import warn
from dkvm.schema import NetChange

SETTLE = 0.3            # libnetwork configures an interface in one burst of netlink messages
UNPLUG_WAIT = 15        # the guest acknowledging a NIC's removal (ACPI eject)
# rtnetlink multicast groups: links, IPv4 and IPv6 addresses and routes
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
RTM_NEWLINK, RTM_DELLINK = 16, 17
NLMSGHDR = struct.Struct("IHHII")       # length, type, flags, sequence, port
IFI_INDEX = struct.Struct("i")          # in an ifinfomsg, after family, pad and type


def only_about(datagram, indexes):
    """Whether a netlink datagram holds link messages of `indexes` alone: our taps going
    up and down as QEMU opens them and the guest runs, which need no look (and no
    pyroute2 loaded for one)."""
    offset = 0
    while offset + NLMSGHDR.size + 8 <= len(datagram):
        length, kind, _, _, _ = NLMSGHDR.unpack_from(datagram, offset)
        if kind not in (RTM_NEWLINK, RTM_DELLINK) or length < NLMSGHDR.size + 8 or \
                IFI_INDEX.unpack_from(datagram, offset + NLMSGHDR.size + 4)[0] not in indexes:
            return False
        offset += (length + 3) & ~3
    return offset > 0


def route_changes(before, after):
    """What the guest must delete and add to go from one route list to the other."""
    return [r for r in before if r not in after], [r for r in after if r not in before]


class NetworkFollower:
    """Watches the container's namespace from a thread; frames for the guest come out
    of `inbox`, one per datagram, for the entrypoint's loop to pass on in order."""

    def __init__(self):
        self.monitor = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        self.monitor.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
                           | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE))
        self.inbox, self.outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.nics = {}                  # container-side ifindex -> tap number
        self.refused = set()            # ifindexes that could not be plugged: not retried,
                                        # or each failure's clean-up would trigger the next
        self.routes = []
        self.taps = set()               # our taps' ifindexes: their own changes need no look
        self.sysctl = ipv6_sysctls()
        self.next_number = 0
        self.qmp_path, self.qmp = None, None
        self.shared_monitor = None      # QMP, one thread at a time (container.shared_monitor)

    def start(self, interfaces, qmp_path, routes, taps=()):
        """Follow from the boot-time interfaces (tapped in this order: `taps`, their
        taps' ifindexes) and Docker's routes through them (net/handover) on."""
        self.nics = {iface.index: number for number, iface in enumerate(interfaces)}
        self.taps = set(taps)
        self.next_number = len(interfaces)
        self.qmp_path = qmp_path
        from dkvm.container.shared_monitor import SharedMonitor
        self.shared_monitor = SharedMonitor(qmp_path)
        self.routes = list(routes)
        threading.Thread(target=self.run, name="network-follower", daemon=True).start()

    def run(self):
        dirty = False
        while True:
            ready, _, _ = select.select([self.monitor], [], [], SETTLE if dirty else None)
            if ready:
                try:
                    datagram = self.monitor.recv(1 << 16)
                except OSError:         # ENOBUFS: events were lost; a full look follows
                    datagram = b""
                dirty = dirty or not only_about(datagram, self.taps)
                continue
            dirty = False
            try:
                with open_iproute() as ip:
                    self.follow(ip)
            except Exception as err:        # keep the container running; say why
                warn(f"cannot follow a network change into the VM: {err}")
            finally:
                if self.qmp is not None:
                    self.qmp.close()
                    self.qmp = None

    def follow(self, ip):
        links = {link["index"]: link for link in guest_links(ip)}
        for index in [index for index in self.nics if index not in links]:
            number = self.nics.pop(index)
            try:
                self.unplug(ip, number)
            except Exception as err:
                warn(f"cannot unplug {nic_id(number)} from the VM: {err}")
        added = []
        for index, link in links.items():
            if index in self.nics or index in self.refused or not link["flags"] & IFF_UP:
                continue                # (down: libnetwork has not finished with it)
            try:
                added.append(self.plug(ip, link))
            except Exception as err:
                self.refused.add(index)
                warn(f"cannot hot-plug {link.get_attr('IFLA_IFNAME')} into the VM, it stays "
                     f"in the container: {err}")
        routes = self.current_routes(ip)
        removed_routes, added_routes = route_changes(self.routes, routes)
        self.routes = routes
        sysctl = ipv6_sysctls()         # Docker turns IPv6 on for lo with an IPv6 network
        sysctl_changes = {name: value for name, value in sysctl.items()
                          if self.sysctl.get(name) != value}
        self.sysctl = sysctl
        if added or removed_routes or added_routes or sysctl_changes:
            steps = [sysctl_step(sysctl_changes)] if sysctl_changes else []
            steps += interface_steps(added)
            steps += [route_step(r.mac, r, add=False, optional=True) for r in removed_routes]
            steps += [route_step(r.mac, r, add=True, optional=True) for r in added_routes]
            self.outbox.send(wire.encode(wire.NET, NetChange(
                wait_for=[iface.mac.lower() for iface in added], steps=steps)))

    def plug(self, ip, link):
        """Hand one new interface to the VM; its description for the guest."""
        number = self.next_number       # never reused: an unplug may still be pending
        iface = describe(ip, link)
        iface.routes = []               # they come with the route changes
        tap_index = create_tap(tap_name(number), iface.mtu)
        self.taps.add(tap_index)
        try:
            netdev, device = nic_options(number, iface.mac)
            self.monitor_qmp().execute("netdev_add", **netdev)
            try:
                self.qmp.execute("device_add", **device)
            except Exception:
                self.qmp.execute("netdev_del", id=netdev["id"])
                raise
        except Exception:
            ip.link("del", index=tap_index)
            raise
        hand_over(ip, link["index"], tap_index)
        self.nics[link["index"]] = number
        self.next_number += 1
        return iface

    def unplug(self, ip, number):
        qmp = self.monitor_qmp()
        qmp.execute("device_del", id=nic_id(number))
        if not qmp.wait_event("DEVICE_DELETED", lambda data: data.get("device") == nic_id(number),
                              UNPLUG_WAIT):
            warn(f"the guest did not release {nic_id(number)} within {UNPLUG_WAIT}s")
        qmp.execute("netdev_del", id=netdev_id(number))
        for index in ip.link_lookup(ifname=tap_name(number)):
            ip.link("del", index=index)

    def current_routes(self, ip):
        """Docker's routes through the guest's interfaces (not those the guest's kernel
        makes for its addresses), each with its interface's MAC."""
        macs = {link["index"]: link.get_attr("IFLA_ADDRESS") for link in guest_links(ip)}
        return [route for index in self.nics if index in macs
                for route in docker_routes(ip, index, macs[index])]

    def monitor_qmp(self):
        """Connected for one change at a time: QEMU serves one QMP client (shared with a
        pod's member exports: shared_monitor), and a person debugging the VM may want
        it between changes."""
        if self.qmp is None:
            self.qmp = self.shared_monitor.connect()
        return self.qmp
