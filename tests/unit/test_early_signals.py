"""A signal sent while the VM boots is not lost: the runtime waits until the container's
entrypoint blocks it, and the guest holds it until the new workload has set up its
handler (or the grace is over)."""
import signal
import subprocess
import sys
import time

from dkvm.guest.loop import EarlySignals
from dkvm.host.kill import wait_until_blocked
from dkvm.kernel_names import handles_signal
from waiting import wait_until

# a process that sets its handler for USR1 only after a while, then reports
LATE_HANDLER = """
import signal, sys, time
time.sleep(0.2)
signal.signal(signal.SIGUSR1, lambda *a: (print("got USR1", flush=True), sys.exit(3)))
print("ready", flush=True)
time.sleep(10)
"""


def delivered(early):
    """One turn of the guest loop's early signals: True once none waits."""
    early.deliver_ready()
    return not early.waiting


def own_status():
    with open("/proc/self/status", "rb") as f:
        return f.read()


def test_status_shows_what_a_process_catches_blocks_and_ignores():
    assert not handles_signal(own_status(), signal.SIGUSR2)
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        assert handles_signal(own_status(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
    try:
        assert handles_signal(own_status(), signal.SIGUSR2)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR2])


def test_a_signal_waits_for_the_workloads_handler():
    child = subprocess.Popen([sys.executable, "-c", LATE_HANDLER], stdout=subprocess.PIPE,
                             text=True)
    early = EarlySignals(child.pid, grace=5)
    early.deliver(signal.SIGUSR1)               # at once it would kill the child
    wait_until(lambda: delivered(early), "the handler, then the signal", timeout=5,
               interval=early.timeout(1))
    assert child.wait(timeout=10) == 3
    assert child.stdout.read() == "ready\ngot USR1\n"


def test_after_the_grace_a_signal_takes_its_default_action():
    child = subprocess.Popen(["sleep", "30"])
    early = EarlySignals(child.pid, grace=0.2)
    started = time.monotonic()
    early.deliver(signal.SIGTERM)
    assert early.waiting == [signal.SIGTERM]
    wait_until(lambda: delivered(early), "the grace to run out", timeout=5, interval=0.01)
    assert time.monotonic() - started >= 0.2
    assert child.wait(timeout=10) == -signal.SIGTERM


def test_the_runtime_waits_until_dkvms_entrypoint_blocks_the_signal():
    # a stand-in entrypoint: its command line ends as DKVM's does; it blocks late
    code = ("import signal, time; time.sleep(0.3); "
            "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]); time.sleep(10)")
    child = subprocess.Popen([sys.executable, "-c", code, "/.dkvm/entry/dkvm-ctr-entrypoint"])
    try:
        wait_until(lambda: b"dkvm-ctr-entrypoint" in open(f"/proc/{child.pid}/cmdline",
                                                            "rb").read(),
                   "the stand-in to start", timeout=10, interval=0.005)
        started = time.monotonic()
        wait_until_blocked(child.pid, signal.SIGTERM, timeout=5)
        assert 0.15 < time.monotonic() - started < 4
        with open(f"/proc/{child.pid}/status", "rb") as f:
            assert handles_signal(f.read(), signal.SIGTERM)
    finally:
        child.kill()
        child.wait()


def test_the_runtime_does_not_wait_for_a_process_not_dkvms():
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = time.monotonic()
        wait_until_blocked(child.pid, signal.SIGTERM, timeout=5)
        assert time.monotonic() - started < 0.5
    finally:
        child.kill()
        child.wait()
