"""guest.loop.GuestLoop's own frames: signals and resizes for the workload, bad frames
logged and survived, an exec that cannot start, RELEASE; a signal sent while the VM
boots held until the new workload has set up its handler (or the grace is over)."""
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from harness import CHANNEL, WAIT, GuestHarness
from dkvm import wire
from dkvm.guest.loop import EarlySignals
from dkvm.schema import ExecStart, Process
from dkvm.wire import EXEC_START, RESIZE, SIGNAL, STDERR, STDIN, STDOUT, WINDOW, Frame
from waiting import wait_until


def control_frames(harness, ftype, **kw):
    return [f for f in harness.received() if f.type == ftype]


def test_a_signal_frame_reaches_the_workload_and_its_exit_ends_the_loop():
    harness = GuestHarness(["sh", "-c",
                            'trap "exit 3" USR1; echo up; while :; do sleep 0.05; done'])
    try:
        assert select.select([harness.workload.stdout], [], [], WAIT)[0]     # trap set
        assert harness.workload.stdout.readline() == b"up\n"
        harness.send(SIGNAL, {"signal": signal.SIGUSR1}, channel=0)
        harness.run_until(lambda: harness.loop.status is not None)
        assert harness.loop.status == 3
    finally:
        harness.close()


def test_a_resize_frame_sizes_the_console():
    master, console = os.openpty()
    harness = GuestHarness()
    try:
        harness.loop.console = console
        harness.send(RESIZE, {"rows": 41, "cols": 123}, channel=0)
        harness.run_until(lambda: os.get_terminal_size(master) == (123, 41))
    finally:
        harness.close()
        os.close(master)
        os.close(console)


@pytest.mark.parametrize("frame", [
    wire.encode(SIGNAL, b'{"signal":"KILL"}'),
    wire.encode(SIGNAL, b'{"signal":0}'),
    wire.encode(RESIZE, b"[]"),
    wire.encode(wire.NET, b'{"wait_for":7}'),
    wire.encode(WINDOW, b'{"bytes":"lots"}', CHANNEL),
    b"garbage!" * 3,
])
def test_a_bad_frame_is_logged_and_the_loop_goes_on(frame, capsys):
    harness = GuestHarness().start_exec(["cat"])
    try:
        harness.send_raw(frame)
        harness.run_until(lambda: "dkvm: " in capsys.readouterr().err)
        assert harness.loop.status is None and harness.workload.poll() is None
        harness.send(STDIN, b"still here\n")      # the exec goes on
        harness.send(STDIN, b"")
        assert harness.finish() == 0 and harness.payload(STDOUT) == b"still here\n"
    finally:
        harness.close()


@pytest.mark.parametrize("start", [
    ExecStart(process=Process(args=["true"])).to_json().encode(),   # spawning fails
    b'{"process":{"uid":-1}}',                                     # not a process
])
def test_an_exec_that_cannot_start_ends_with_126(start):
    harness = GuestHarness()
    try:
        def refuse(process, workload_pid, stdio):
            raise OSError(24, "Too many open files")
        harness.loop.spawn_exec = refuse
        harness.send(EXEC_START, start)
        harness.run_until(lambda: harness.exits())
        assert harness.exits() == [126]
        assert b"exec failed in the guest" in harness.payload(STDERR)
    finally:
        harness.close()



def test_the_guest_lets_go_of_unused_inodes_when_asked(monkeypatch, tmp_path):
    from dkvm.guest import loop as loop_module
    drop = tmp_path / "drop_caches"
    drop.write_text("")
    monkeypatch.setattr(loop_module, "DROP_CACHES", str(drop))
    harness = GuestHarness()
    try:
        harness.loop.on_frame(Frame(wire.RELEASE))
    finally:
        harness.close()
    assert drop.read_text() == "2"


# --- early signals -------------------------------------------------------------------

# a workload that sets its handler for USR1 only when told to, on its stdin, then reports
LATE_HANDLER = """
import signal, sys
sys.stdin.readline()
signal.signal(signal.SIGUSR1, lambda *a: (print("got USR1", flush=True), sys.exit(3)))
print("ready", flush=True)
sys.stdin.readline()
"""


def delivered(early):
    """One turn of the guest loop's early signals: True once none waits."""
    early.deliver_ready()
    return not early.waiting


def test_a_signal_waits_for_the_workloads_handler():
    child = subprocess.Popen([sys.executable, "-c", LATE_HANDLER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        early = EarlySignals(child.pid, grace=10)
        early.deliver(signal.SIGUSR1)               # at once it would kill the child
        assert early.waiting == [signal.SIGUSR1]
        assert not delivered(early)                 # no handler yet: still held
        child.stdin.write("handle\n")
        child.stdin.flush()
        wait_until(lambda: delivered(early), "the handler, then the signal", timeout=10,
                   interval=early.timeout(1))
        assert child.wait(timeout=10) == 3
        assert child.stdout.read() == "ready\ngot USR1\n"
    finally:
        child.kill()
        child.wait()


def test_after_the_grace_a_signal_takes_its_default_action():
    child = subprocess.Popen(["sleep", "30"])
    early = EarlySignals(child.pid, grace=0.2)
    started = time.monotonic()
    early.deliver(signal.SIGTERM)
    assert early.waiting == [signal.SIGTERM]
    wait_until(lambda: delivered(early), "the grace to run out", timeout=5, interval=0.01)
    assert time.monotonic() - started >= 0.2
    assert child.wait(timeout=10) == -signal.SIGTERM
