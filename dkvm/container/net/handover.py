"""The container's interfaces handed to the VM at start, in a child process.

pyroute2 (its IPRoute brings asyncio, ssl and OpenSSL: about 15 MiB) is loaded in the
child, which exits once the taps carry the interfaces, not in the entrypoint, which
lives as long as the container: an idle container's entrypoint stays a small Python.
It loads pyroute2 again only if Docker changes the network (net/follower) or when it
gives a kept namespace its interfaces back. The child runs beside QEMU starting; what
it found comes back as JSON on a pipe."""
import os
import select
import socket
import time

from dkvm import lightjson
from dkvm.errors import DkvmError
from dkvm.schema import Interface, NetStep, Route

HANDOVER_WAIT = 60          # s: netlink work on a loaded host; a child stuck past it is killed


class Handover:
    """Starts the child at once; `result()` is (interfaces, the guest's network steps,
    Docker's routes through them) or a DkvmError with the child's reason."""

    def __init__(self, nics, taps, docker_dns, monitor=None, work=None):
        self.read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:               # the child: never returns
            os.close(self.read_fd)
            try:
                reply = {"found": (work or hand_over_network)(nics, taps, docker_dns, monitor)}
            except BaseException as err:
                reply = {"error": getattr(err, "message", None) or f"{err}"}
            try:
                data = memoryview(lightjson.dumps(reply).encode())
                while data:
                    data = data[os.write(write_fd, data):]
            finally:
                os._exit(0)
        os.close(write_fd)

    def result(self, timeout=HANDOVER_WAIT):
        deadline, chunks = time.monotonic() + timeout, []
        try:
            while True:
                ready, _, _ = select.select([self.read_fd], [], [],
                                            max(0, deadline - time.monotonic()))
                if not ready:
                    raise DkvmError(f"handing the container's interfaces to the VM took "
                                    f"over {timeout}s")
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self.read_fd)
            self.reap()
        reply = lightjson.loads(b"".join(chunks).decode() or "{}")
        if "found" not in reply:
            raise DkvmError("cannot hand the container's interfaces to the VM: "
                            f"{reply.get('error', 'the helper process died')}")
        interfaces, steps, routes = reply["found"]
        return ([Interface.from_dict(i) for i in interfaces],
                [NetStep.from_dict(s) for s in steps], [Route.from_dict(r) for r in routes])

    def reap(self):
        if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)


def hand_over_network(nics, taps, docker_dns, monitor=None):
    """In the child: the interfaces become plumbing (plumbing.take_over_interfaces);
    the guest's steps to rebuild them, after the IPv6 switches Docker set here; and
    Docker's routes through them, where the network follower starts from. What the
    follower's `monitor` socket (shared with the entrypoint) heard of the taps and of
    this hand-over is dropped first: the follower would take a full look at them (and
    load pyroute2 for it), and the routes read after the drop hold them anyway; a
    change after the drop stays for it."""
    from dkvm.container.net.plumbing import (docker_routes, ipv6_sysctls, open_iproute,
                                             take_over_interfaces)
    from dkvm.container.net.steps import interface_steps, sysctl_step
    interfaces = take_over_interfaces(nics, taps, docker_dns=docker_dns)
    if monitor is not None:
        drain(monitor)
    steps = [sysctl_step(ipv6_sysctls())] + interface_steps(interfaces)
    with open_iproute() as ip:
        routes = [route for iface in interfaces
                  for route in docker_routes(ip, iface.index, iface.mac)]
    return ([i.as_dict() for i in interfaces], [s.as_dict() for s in steps],
            [r.as_dict() for r in routes])


def drain(sock):
    """Every datagram queued on `sock`, dropped."""
    while True:
        try:
            sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:                 # ENOBUFS: some were lost, the rest still to drop
            continue
