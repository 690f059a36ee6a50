"""container.shared_monitor: QEMU's monitor, one thread's at a time (the network
follower's and a pod's member exports), waited for within a bound, given back at
close and when QEMU cannot be reached."""
import threading

import pytest

from harness import WAIT
from dkvm.container.shared_monitor import SharedMonitor
from dkvm.errors import DkvmError


class FakeQmp:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_the_monitor_is_one_threads_at_a_time():
    monitor = SharedMonitor("/nonexistent/qmp.sock")
    first = monitor.connect(connect=lambda path: FakeQmp())
    with pytest.raises(DkvmError, match="QEMU's monitor stayed busy for 0.05s"):
        monitor.connect(wait=0.05, connect=lambda path: FakeQmp())
    waiting = threading.Thread(target=lambda: monitor.connect(connect=lambda p: FakeQmp()).close())
    waiting.start()
    first.close()                       # given back: the other thread gets it
    waiting.join(WAIT)
    assert not waiting.is_alive()


def test_a_monitor_that_cannot_be_reached_is_given_back():
    monitor = SharedMonitor("/nonexistent/qmp.sock")

    def unreachable(path):
        raise DkvmError(f"cannot reach QEMU's monitor at {path}")
    with pytest.raises(DkvmError):
        monitor.connect(connect=unreachable)
    monitor.connect(wait=0, connect=lambda path: FakeQmp()).close()
