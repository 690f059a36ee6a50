"""QEMU's monitor, shared by the threads of the container side that change the running
VM: the network follower (hot-plugged NICs) and, in a pod's sandbox, the members'
exports (container.member_exports).

QEMU serves one QMP client at a time: a second one connects, but gets no greeting
until the first leaves, so two threads each opening their own connection would have
one of them time out. Each takes the monitor's lock for one connection (one change),
and closing that connection gives the lock back; between changes nobody holds it, so
a person debugging the VM may connect too."""
import threading

from dkvm.boot.qmp import Qmp
from dkvm.errors import DkvmError

# The longest a change waits for the other thread's: a NIC's unplug waits for the
# guest (follower.UNPLUG_WAIT, 15 s) and then some QMP round trips.
LOCK_WAIT = 30


class SharedMonitor:
    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()

    def connect(self, wait=LOCK_WAIT, connect=Qmp):
        """A QMP client, ours until closed; DkvmError if the other thread kept the
        monitor for `wait` seconds or QEMU does not answer."""
        if not self.lock.acquire(timeout=wait):
            raise DkvmError(f"QEMU's monitor stayed busy for {wait}s")
        try:
            return LockedClient(connect(self.path), self.lock)
        except BaseException:
            self.lock.release()
            raise


class LockedClient:
    """A QMP client (boot.qmp.Qmp) holding the monitor's lock until it is closed."""

    def __init__(self, qmp, lock):
        self.qmp, self.lock = qmp, lock

    def execute(self, command, fd=None, **arguments):
        return self.qmp.execute(command, fd=fd, **arguments)

    def wait_event(self, name, matches, timeout):
        return self.qmp.wait_event(name, matches, timeout)

    def close(self):
        if self.lock is None:
            return
        try:
            self.qmp.close()
        finally:
            self.lock.release()
            self.lock = None
