"""The guest side of networking: run the steps the container side prepared
(container.net.steps) to rebuild each container interface, found by its MAC, at boot
and when Docker connects, disconnects or re-routes networks of the running container
(container.net.follower).

Only struct and a netlink socket here: the requests come encoded, this fills in the
NIC's index and the sequence number and checks each acknowledgement."""
import _socket as socket   # not `socket`: it imports enum, a cost in the guest
import os
import struct
import time

from dkvm.errors import DkvmError
from dkvm.guest import syscalls
from dkvm.schema import NetChange

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
INDEX_OFFSET = 20           # ifi_index / ifa_index: after nlmsghdr (16) and 4 bytes
RTMSG_END = 28              # nlmsghdr (16) + rtmsg (12): the route's attributes follow
RTA_OIF = 4
NIC_WAIT = 30               # a hot-plugged NIC showing up in the guest (ACPI, then the driver)
RUNNING_WAIT = 10           # a NIC that is up being marked running
LINK_SCOPE = "20"           # /proc/net/if_inet6: address, index, prefix, scope, flags, name


def links_by_mac():
    found = {}
    for name in os.listdir("/sys/class/net"):
        with open(f"/sys/class/net/{name}/address") as f:
            mac = f.read().strip()
        with open(f"/sys/class/net/{name}/ifindex") as f:
            found[mac] = int(f.read())
    return found


def wait_for_links(macs, timeout=NIC_WAIT):
    """Until a NIC with each MAC is there (hot-plugged ones come through ACPI and the
    driver's probe), bounded: a missing one is then the network steps' error."""
    deadline = time.monotonic() + timeout
    while not set(macs) <= set(links_by_mac()) and time.monotonic() < deadline:
        time.sleep(0.005)


def run_steps(steps, until_waiting=False):
    """Run the steps in order. A NIC not running yet is waited for (bounded) or, with
    `until_waiting`, left to the caller to finish: the steps left are returned."""
    if not steps:
        return []
    by_mac = links_by_mac()
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        for seq, step in enumerate(steps, 1):
            if step.kind == "sysctl":
                syscalls.write_sysctls(step.sysctl)
                continue
            if step.kind == "running":
                if until_waiting and not is_running(step.name, step.ipv6):
                    return steps[seq - 1:]
                wait_until_running(step.name, step.ipv6)
                continue
            index = by_mac.get(step.mac)
            if index is None:
                if step.optional:
                    continue            # its NIC is gone, and what the step was for with it
                raise DkvmError(f"no guest NIC with MAC {step.mac} for {step.what}")
            request = bytearray.fromhex(step.netlink)
            struct.pack_into("I", request, 8, seq)
            set_index(request, step.kind, index)
            sock.send(request)
            error = wait_ack(sock, seq)
            if error and error not in step.ignore:
                raise OSError(error, f"{step.what}: {os.strerror(error)}")
    finally:
        sock.close()
    return []


def wait_until_running(name, ipv6, timeout=RUNNING_WAIT):
    """Until the kernel's link watcher has marked the NIC running (operstate up) and,
    with IPv6, given it its link-local address. Bounded: a NIC still down after that
    is the network's problem, not the boot's."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not is_running(name, ipv6):
        time.sleep(0.01)


def is_running(name, ipv6):
    return read(f"/sys/class/net/{name}/operstate").strip() == "up" and (
        not ipv6 or any(fields[3] == LINK_SCOPE and fields[5] == name
                        for fields in map(str.split, read("/proc/net/if_inet6").splitlines())))


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def set_index(request, kind, index):
    if kind != "route":
        struct.pack_into("i", request, INDEX_OFFSET, index)
        return
    offset = RTMSG_END
    while offset < len(request):
        length, attr = struct.unpack_from("HH", request, offset)
        if attr == RTA_OIF:
            struct.pack_into("I", request, offset + 4, index)
            return
        offset += (length + 3) & ~3
    raise ValueError("a route request without RTA_OIF")


def wait_ack(sock, seq):
    """The request's error code (0: done)."""
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset < len(data):
            length, msg_type, _, msg_seq, _ = struct.unpack_from("IHHII", data, offset)
            if msg_type == NLMSG_ERROR and msg_seq == seq:
                return -struct.unpack_from("i", data, offset + 16)[0]
            offset += (length + 3) & ~3


class PendingChanges:
    """Network changes wait, in order, for their hot-plugged NICs to show up; init's
    loop polls. (Not a thread: init has unshared its PID namespace for the workload,
    after which the kernel refuses it new threads.)"""

    POLL = 0.05

    def __init__(self):
        self.waiting = []               # [(schema.NetChange, deadline)]

    def add(self, change):
        self.waiting.append((change, time.monotonic() + NIC_WAIT))

    def timeout(self, idle):
        return min(idle, self.POLL) if self.waiting else idle

    def apply_ready(self):
        """Apply the changes whose NICs are there; the errors of those that failed."""
        errors = []
        while self.waiting:
            change, deadline = self.waiting[0]
            missing = set(change.wait_for) - set(links_by_mac())
            if missing and time.monotonic() < deadline:
                break
            self.waiting.pop(0)
            try:
                if missing:
                    raise DkvmError(f"hot-plugged NICs {sorted(missing)} did not appear "
                                       f"in the guest within {NIC_WAIT}s")
                # a new NIC takes up to a second to run: exec I/O goes on meanwhile
                left = run_steps(change.steps, until_waiting=time.monotonic() < deadline)
            except Exception as err:
                errors.append(str(err))
                continue
            if left:
                self.waiting.insert(0, (NetChange(steps=left), deadline))
                break
        return errors
