"""guest.loop.GuestLoop's own frames: signals and resizes for the workload, bad frames
logged and survived, an exec that cannot start, RELEASE; a signal sent while the VM
boots held until the new workload has set up its handler (or the grace is over); a
pod's members (guest.members stood in for): their sessions, signals and execs."""
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from harness import CHANNEL, WAIT, GuestHarness
from dkvm import wire
from dkvm.errors import DkvmError
from dkvm.guest import loop
from dkvm.guest.loop import EarlySignals
from dkvm.schema import ExecStart, Plan, Process
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


class FakePodMembers:
    """guest.members without mounts or namespaces: an export is a directory, a member's
    PID 1 a plain child of the test (the harness reaps it as an exec)."""

    def __init__(self, harness_of, tmp_path):
        self.harness_of, self.tmp_path = harness_of, tmp_path
        self.mounted, self.removed, self.spawned, self.ended = [], [], [], []

    def export_root(self, tag):
        self.mounted.append(tag)
        return str(self.tmp_path / tag / "rootfs")

    def remove_member(self, tag, volumes=()):
        self.removed.append(tag)

    def mount_volumes(self, volumes):
        return []

    def end_member(self, tag):
        self.ended.append(tag)

    def spawn_member(self, plan, root, stdio, workload_pid, tag, volumes=()):
        self.spawned.append((plan.process.args, root, workload_pid))
        return self.harness_of().spawn(plan.process, workload_pid, stdio)

    def fork_in(self, member_pid, workload_pid):
        raise AssertionError("the harness's spawn forks by itself")


def member_start(args, container_id="app", tag="m1"):
    return wire.MemberStart(container_id=container_id, tag=tag,
                            plan=Plan(process=Process(args=args)))


@pytest.fixture
def pod(tmp_path):
    harnesses = []
    members = FakePodMembers(lambda: harnesses[0], tmp_path)
    harnesses.append(GuestHarness(pod_members=members))
    yield harnesses[0], members
    harnesses[0].close()


def test_a_pod_member_runs_in_its_own_export_and_its_status_ends_its_session(pod):
    harness, members = pod
    harness.send(wire.MEMBER_START, member_start(["sh", "-c", "echo in-member; exit 3"]))
    harness.run_until(lambda: CHANNEL in harness.loop.sessions)
    harness.session = harness.loop.sessions[CHANNEL]
    assert harness.finish() == 3
    assert harness.payload(STDOUT) == b"in-member\n"
    assert members.mounted == ["m1"] and members.removed == ["m1"] and members.ended == ["m1"]
    assert members.spawned[0][1].endswith("m1/rootfs")
    assert harness.loop.members == {}


def test_a_signal_on_a_members_channel_reaches_its_pid_1(pod):
    harness, _ = pod
    harness.send(wire.MEMBER_START, member_start(
        ["sh", "-c", "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done"]))
    harness.run_until(lambda: b"ready" in harness.payload(STDOUT), auto_ack=True)
    harness.session = harness.loop.sessions[CHANNEL]
    harness.send(SIGNAL, {"signal": signal.SIGTERM})
    assert harness.finish() == 42


def test_an_exec_names_a_member_and_runs_in_its_namespaces(pod):
    harness, _ = pod
    harness.send(wire.MEMBER_START, member_start(["sleep", "300"]))
    harness.run_until(lambda: "app" in harness.loop.members)
    member_pid = harness.loop.members["app"].pid
    harness.other_channels.add(CHANNEL + 1)
    harness.send(EXEC_START, ExecStart(process=Process(args=["true"]), member="app"),
                 channel=CHANNEL + 1)
    harness.run_until(lambda: any(f.type == wire.EXEC_EXIT for f in harness.others))
    assert harness.exec_target == member_pid and harness.exec_forked_in_member
    assert [f.record().status for f in harness.others if f.type == wire.EXEC_EXIT] == [0]


def test_an_exec_waits_for_its_members_start(pod):
    harness, _ = pod
    harness.other_channels.add(CHANNEL + 1)
    harness.send(EXEC_START, ExecStart(process=Process(args=["true"]), member="app"),
                 channel=CHANNEL + 1)
    harness.idle(0.1)
    assert harness.others == [] and harness.exec_pid is None
    harness.send(wire.MEMBER_START, member_start(["sleep", "300"]))
    harness.run_until(lambda: any(f.type == wire.EXEC_EXIT for f in harness.others))
    assert harness.exec_target == harness.loop.members["app"].pid


def test_an_exec_into_no_such_member_or_a_member_started_twice_is_refused(pod, monkeypatch):
    harness, members = pod
    monkeypatch.setattr("dkvm.guest.loop.MEMBER_WAIT", 0.05)
    harness.other_channels.add(CHANNEL + 1)
    harness.send(EXEC_START, ExecStart(process=Process(args=["true"]), member="gone"),
                 channel=CHANNEL + 1)
    harness.run_until(lambda: any(f.type == wire.EXEC_EXIT for f in harness.others))
    assert b"no container gone runs in this pod" in b"".join(
        f.payload for f in harness.others if f.type == STDERR)
    harness.send(wire.MEMBER_START, member_start(["sleep", "300"]))
    harness.run_until(lambda: "app" in harness.loop.members)
    harness.others.clear()
    harness.send(wire.MEMBER_START, member_start(["sleep", "300"], tag="m2"),
                 channel=CHANNEL + 1)
    harness.run_until(lambda: any(f.type == wire.EXEC_EXIT for f in harness.others))
    assert [f.record().status for f in harness.others if f.type == wire.EXEC_EXIT] == [126]
    assert members.mounted == ["m1"]


def test_the_plan_is_awaited_as_long_as_the_container_side_takes(monkeypatch):
    """The guest asks for its plan and waits for it however late it comes: the container
    side bounds the boot (before: 30 s of the guest's clock, and a loaded host's boot
    failed with "no plan"). The clock here runs a minute on at each look."""
    minutes = itertools.count(0, 60)
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(minutes))
    guest, container_side = socket.socketpair()
    guest.setblocking(False)        # a read finding nothing fails the test, never hangs it
    try:
        container_side.sendall(wire.encode(wire.PLAN, Plan(container_id="c1")))
        plan = loop.receive_plan(guest.fileno(), wire.Decoder())
        assert plan.container_id == "c1"
        assert [f.type for f in wire.Decoder().feed(container_side.recv(100))] == [wire.INIT]
        container_side.shutdown(socket.SHUT_WR)
        with pytest.raises(DkvmError, match="closed the control channel"):
            loop.receive_plan(guest.fileno(), wire.Decoder())
    finally:
        guest.close()
        container_side.close()
