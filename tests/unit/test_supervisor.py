"""container.supervisor: the control channel's container side, run against a scenario
over socketpairs: frames held until HELLO, channels for exec relays, signals and
signal requests, malformed frames and protocol breaches, the exec cap, the boot
timeout and the watchdog, the helpers' ends, virtiofsd's descriptors."""
import os
import signal
import socket
import subprocess
import time

import pytest

from harness import QUIET, WAIT, FakeVm, exec_start, signal_from_another_process
from dkvm import wire
from dkvm.container import supervisor as supervisor_module
from dkvm.container.member_exports import MemberExports
from dkvm.container.supervisor import Supervisor, free_channel
from dkvm.errors import DkvmError
from dkvm.roles.ctr_entrypoint import listen
from dkvm.schema import NetChange, NetStep, Options, Plan
from dkvm.wire import (CLOSE, EXEC_EXIT, EXEC_START, EXIT, EXIT_ACK, HELLO, MAX_DATA, SIGNAL,
                       STDERR, STDIN, STDOUT, STREAM_WINDOW, WINDOW, Frame)


def test_supervise_multiplexes_exec_relays(mux, capsys):
    channels = {}

    def scenario(guest, connect_relay):
        relays = {}
        for name in "abcd":
            relays[name] = connect_relay()
            relays[name].send(EXEC_START, exec_start(name), channel=99)  # the channel is ours
        relays.pop("d").close()             # gone before the guest is even up
        # nothing reaches the guest before it says hello: it could not take it yet
        guest.quiet()
        guest.send(HELLO)
        frames = [guest.recv() for _ in range(5)]
        starts = [f for f in frames if f.type == EXEC_START]
        for frame in starts:
            channels[frame.record().process.args[0]] = frame.channel
        assert sorted(channels) == list("abcd")
        assert 0 not in channels.values() and len(set(channels.values())) == 4
        closes = [f for f in frames if f.type == CLOSE]
        assert [f.channel for f in closes] == [channels["d"]]
        assert frames.index(closes[0]) > frames.index(
            next(f for f in starts if f.channel == channels["d"]))

        # guest -> relay: only to its own channel's relay, on channel 0
        for name, relay in relays.items():
            guest.send(STDOUT, f"out-{name}".encode(), channels[name])
            guest.send(STDERR, f"err-{name}".encode(), channels[name])
        guest.send(STDOUT, b"nobody", 999)     # no such channel: dropped
        for name, relay in relays.items():
            assert relay.recv() == Frame(STDOUT, 0, f"out-{name}".encode())
            assert relay.recv() == Frame(STDERR, 0, f"err-{name}".encode())
        for relay in relays.values():
            relay.quiet(0.05)

        # relay -> guest: on the relay's channel
        relays["b"].send(STDIN, b"in-b")
        assert guest.recv() == Frame(STDIN, channels["b"], b"in-b")
        relays["a"].send(WINDOW, {"bytes": 5})
        assert guest.recv() == Frame(WINDOW, channels["a"], b'{"bytes":5}')

        # garbage from one relay is reported; the others, and it, carry on
        relays["c"].sock.sendall(b"garbage!" * 4)
        relays["a"].send(STDIN, b"after garbage")
        assert guest.recv() == Frame(STDIN, channels["a"], b"after garbage")
        relays["c"].send(STDIN, b"c again")
        assert guest.recv() == Frame(STDIN, channels["c"], b"c again")
        guest.send(STDOUT, b"to c", channels["c"])
        assert relays["c"].recv() == Frame(STDOUT, 0, b"to c")

        # a relay that leaves: the guest hears CLOSE on its channel
        relays.pop("b").close()
        assert guest.recv() == Frame(CLOSE, channels["b"])
        guest.send(STDOUT, b"late", channels["b"])      # dropped, harmlessly
        guest.send(EXEC_EXIT, {"status": 0}, channels["a"])
        assert relays["a"].recv() == Frame(EXEC_EXIT, 0, b'{"status":0}')

        # the workload's exit: acknowledged, and the supervisor ends when the guest goes
        guest.send(EXIT, {"status": 42})
        assert guest.recv() == Frame(EXIT_ACK)
        guest.quiet(0.05)

    assert mux(scenario) == 42
    err = capsys.readouterr().err
    assert "dkvm: control channel: malformed frame header" in err
    assert err.count("malformed") == 1


def test_supervise_forwards_signals_after_hello(mux):
    def scenario(guest, connect_relay):
        relay = connect_relay()
        relay.send(EXEC_START, exec_start("x"))
        guest.send(HELLO)
        assert guest.recv().type == EXEC_START      # the supervisor's loop is up
        signal_from_another_process(signal.SIGUSR1)
        frame = guest.recv()
        assert (frame.type, frame.record().signal) == (SIGNAL, signal.SIGUSR1)
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == Frame(EXIT_ACK)

    assert mux(scenario) == 0


def test_supervise_passes_network_changes_on_after_hello(mux):
    change = NetChange(wait_for=["02:00:00:00:00:09"],
                       steps=[NetStep(kind="running", name="eth1")])

    def scenario(guest, connect_relay):
        mux.network_follower.send(wire.encode(wire.NET, change))
        guest.quiet()                               # held: the guest is not up yet
        guest.send(HELLO)
        frame = guest.recv()
        assert (frame.type, frame.record()) == (wire.NET, change)
        mux.network_follower.send(wire.encode(wire.NET, NetChange(wait_for=["x"])))
        assert guest.recv().record().wait_for == ["x"]
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == Frame(EXIT_ACK)

    assert mux(scenario) == 0


def test_supervise_returns_after_grace_if_the_guest_stays(mux, monkeypatch):
    monkeypatch.setattr(supervisor_module, "EXIT_GRACE", 0.3)

    def scenario(guest, connect_relay):
        guest.send(HELLO)
        guest.send(EXIT, {"status": 9})
        assert guest.recv() == Frame(EXIT_ACK)
        assert mux.returned.wait(WAIT)          # without the guest closing its end

    assert mux(scenario) == 9


def test_supervise_keeps_a_left_channel_from_the_next_relay(mux):
    """Frames of an exec whose relay left may still be on their way from the guest:
    they must not reach the next relay."""
    def scenario(guest, connect_relay):
        guest.send(HELLO)
        first = connect_relay()
        first.send(EXEC_START, exec_start("first"))
        old = guest.recv().channel
        first.close()
        assert guest.recv() == Frame(CLOSE, old)
        second = connect_relay()
        second.send(EXEC_START, exec_start("second"))
        start = guest.recv()
        assert start.record().process.args == ["second"] and start.channel != old
        guest.send(STDOUT, b"stale", old)       # sent before the guest saw CLOSE
        guest.send(EXEC_EXIT, {"status": 137}, old)
        guest.send(STDOUT, b"fresh", start.channel)
        assert second.recv() == Frame(STDOUT, 0, b"fresh")
        second.quiet(0.1)
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == Frame(EXIT_ACK)

    assert mux(scenario) == 0


def test_supervise_guest_gone_without_status_is_an_error(mux):
    def scenario(guest, connect_relay):
        guest.send(HELLO)

    result = mux(scenario)
    assert isinstance(result, DkvmError)
    assert "without reporting the workload's exit status" in result.message


def test_a_signal_wakes_the_supervisor_at_once(mux):
    """A signal is readable on the signalfd: the turn in progress ends, it does not
    wait out its timeout."""
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, FakeVm(),
                            mux.signals, Plan())
    supervisor.on_hello(Frame(HELLO))
    signal_from_another_process(signal.SIGTERM)
    start = time.monotonic()
    supervisor.step(timeout=30)
    assert time.monotonic() - start < WAIT
    supervisor.guest.flush()
    frame = mux.guest.recv()
    assert (frame.type, frame.record().signal) == (SIGNAL, signal.SIGTERM)


@pytest.mark.parametrize("sig", [signal.SIGRTMIN + 3, signal.SIGRTMAX, signal.SIGWINCH,
                                 signal.SIGSEGV, signal.SIGPIPE, signal.SIGTSTP])
def test_every_signal_from_outside_is_the_workloads(mux, sig):
    """Real-time ones (systemd's SIGRTMIN+3), faults sent by kill, SIGWINCH without
    a terminal: all reach the guest, as runc would deliver them."""
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, FakeVm(),
                            mux.signals, Plan())
    supervisor.on_hello(Frame(HELLO))
    signal_from_another_process(sig)
    supervisor.step(timeout=WAIT)
    supervisor.guest.flush()
    frame = mux.guest.recv()
    assert (frame.type, frame.record().signal) == (SIGNAL, sig)


def test_our_own_signals_and_our_childrens_sigchld_stay_ours(mux):
    """A SIGPIPE we cause ourselves, a child's SIGCHLD: nothing for the workload."""
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, FakeVm(),
                            mux.signals, Plan())
    supervisor.on_hello(Frame(HELLO))
    os.kill(os.getpid(), signal.SIGPIPE)
    subprocess.run(["true"], check=True, timeout=WAIT)
    for _ in range(3):
        supervisor.step(timeout=0.05)
    supervisor.guest.flush()
    mux.guest.quiet()


def signal_request(path, signum):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(path)
    sock.sendall(str(signum).encode() + b"\n")
    return sock


@pytest.mark.parametrize("hello", [True, False])
def test_a_sigkill_request_kills_the_workload_in_the_guest_first(mux, tmp_path, hello):
    """The runtime's SIGKILL goes to the workload in the guest; the runtime's
    connection stays open until the entrypoint ends (then the VM may go), or closes
    at once while there is no workload yet."""
    listener = listen(str(tmp_path / "signal.sock"), backlog=8)
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, FakeVm(),
                            mux.signals, Plan(), signal_listener=listener)
    if hello:
        supervisor.on_hello(Frame(HELLO))
    runtime = signal_request(str(tmp_path / "signal.sock"), signal.SIGKILL)
    supervisor.step(timeout=WAIT)
    if hello:
        supervisor.guest.flush()
        frame = mux.guest.recv()
        assert (frame.type, frame.record().signal) == (SIGNAL, signal.SIGKILL)
        runtime.settimeout(QUIET)
        with pytest.raises(socket.timeout):
            runtime.recv(1)
        for conn in supervisor.killers:     # what the entrypoint's exit does
            conn.close()
    runtime.settimeout(WAIT)
    assert runtime.recv(1) == b""
    runtime.close()
    listener.close()


def test_a_sigstop_request_is_answered_once_passed_on_and_garbage_is_refused(
        mux, tmp_path, capsys):
    listener = listen(str(tmp_path / "signal.sock"), backlog=8)
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, FakeVm(),
                            mux.signals, Plan(), signal_listener=listener)
    supervisor.on_hello(Frame(HELLO))
    runtime = signal_request(str(tmp_path / "signal.sock"), signal.SIGSTOP)
    supervisor.step(timeout=WAIT)
    assert runtime.recv(1) == b""
    supervisor.guest.flush()
    frame = mux.guest.recv()
    assert (frame.type, frame.record().signal) == (SIGNAL, signal.SIGSTOP)
    garbage = signal_request(str(tmp_path / "signal.sock"), "KILL")
    supervisor.step(timeout=WAIT)
    assert garbage.recv(1) == b""
    assert "bad signal request" in capsys.readouterr().err
    supervisor.guest.flush()
    mux.guest.quiet()
    listener.close()


def test_signals_before_hello_are_held_not_lost(mux):
    """dockerd may signal while the VM boots: the signal waits for the guest."""
    def scenario(guest, connect_relay):
        signal_from_another_process(signal.SIGHUP)
        guest.quiet()
        guest.send(HELLO)
        frame = guest.recv()
        assert (frame.type, frame.record().signal) == (SIGNAL, signal.SIGHUP)
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == Frame(EXIT_ACK)

    assert mux(scenario) == 0


@pytest.mark.parametrize("frame,why", [
    (wire.encode(EXIT, b'{"status":"pwn"}'), "frame type 2: bad payload"),
    (wire.encode(EXIT, b'{"status":256}'), "out of range"),
    (wire.encode(wire.ERROR, b'{"message":["x"]}'), "expected str"),
    (wire.encode(wire.EXIT_ACK), "frame type 3 on channel 0"),
    (wire.encode(wire.RESIZE, b'{"rows":1,"cols":1}'), "frame type 6 on channel 0"),
    (wire.encode(STDIN, b"x", 5), "frame type 8 on exec channel 5"),
    (wire.encode(EXEC_EXIT, b'{"status":-1}', 5), "out of range"),
    (b"garbage!" * 4, "malformed frame header"),
])
def test_a_guest_that_breaks_the_protocol_ends_its_container_with_one_line(mux, frame, why):
    def scenario(guest, connect_relay):
        guest.send(HELLO)
        guest.sock.sendall(frame)
        assert mux.returned.wait(WAIT)

    result = mux(scenario)
    assert isinstance(result, DkvmError), result
    assert result.message.startswith("the guest broke the control protocol (")
    assert why in result.message and "\n" not in result.message


def test_a_frame_for_an_exec_long_gone_is_dropped(mux, capsys):
    def scenario(guest, connect_relay):
        guest.send(HELLO)
        guest.send(STDOUT, b"to nobody", 9)
        guest.send(EXIT, {"status": 4})
        assert guest.recv() == Frame(EXIT_ACK)

    assert mux(scenario) == 4
    assert capsys.readouterr().err == ""


def test_output_beyond_an_execs_window_ends_the_container(mux):
    """The guest must wait for the relay's grants; the supervisor holds it to that."""
    def scenario(guest, connect_relay):
        relay = connect_relay()
        relay.send(EXEC_START, exec_start("x"))
        guest.send(HELLO)
        channel = guest.recv().channel
        for _ in range(STREAM_WINDOW // MAX_DATA):
            guest.send(STDOUT, b"o" * MAX_DATA, channel)
        relay.send(WINDOW, {"bytes": MAX_DATA})             # one chunk granted back
        assert guest.recv() == Frame(WINDOW, channel, b'{"bytes":65536}')
        guest.send(STDOUT, b"o" * MAX_DATA, channel)        # within the window again
        guest.send(STDOUT, b"o", channel)                   # one byte too many
        assert mux.returned.wait(WAIT)

    result = mux(scenario)
    assert isinstance(result, DkvmError)
    assert f"{STREAM_WINDOW + 1} bytes for exec channel 1 beyond its window" in result.message


def test_a_guest_that_stops_reading_ends_the_container_at_the_bound(mux, monkeypatch):
    monkeypatch.setattr(supervisor_module, "GUEST_QUEUE_LIMIT", 1 << 20)

    def scenario(guest, connect_relay):
        guest.send(HELLO)
        guest.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        relay = connect_relay()
        relay.send(EXEC_START, exec_start("x"))
        for _ in range(64):         # stdin the guest never reads; the relay may well send
            try:                    # (a relay keeps to the window, this one does not)
                relay.send(STDIN, b"i" * MAX_DATA)
            except OSError:
                break
        assert mux.returned.wait(WAIT)

    result = mux(scenario)
    assert isinstance(result, DkvmError)
    assert "stopped reading its control channel" in result.message


def test_execs_beyond_the_plans_cap_are_refused(mux):
    """The plan's max_execs (what the memory limit has room for) run at once; the next
    gets one line."""
    def scenario(guest, connect_relay):
        guest.send(HELLO)
        first, third = connect_relay(), (connect_relay(), connect_relay())[1]
        refusal = third.recv()                      # one line for that exec, then closed
        assert (refusal.type, refusal.record().message) == (
            wire.ERROR, "too many concurrent execs in this container (at most 2); this one "
                        "was not started")
        assert third.sock.recv(1) == b""
        first.send(EXEC_START, exec_start("a"))
        assert guest.recv().type == EXEC_START
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == Frame(EXIT_ACK)

    assert mux(scenario, plan=Plan(max_execs=2)) == 0


def test_the_guests_error_reaches_the_log_as_plain_text(mux, capsys, log_context):
    log_context.set_role("entrypoint")

    def scenario(guest, connect_relay):
        guest.send(HELLO)
        guest.send(wire.ERROR, {"message": "guest init failed: \x1b]0;owned\x07\nno"})
        guest.send(EXIT, {"status": 125})
        assert guest.recv() == Frame(EXIT_ACK)

    assert mux(scenario) == 125
    assert capsys.readouterr().err == \
        "dkvm[entrypoint]: guest init failed: \\x1b]0;owned\\x07\\nno\n"


@pytest.mark.parametrize("asked, stage", [
    (False, "the guest had not asked for its plan)"),
    (True, "the plan was sent ")])
def test_a_guest_that_never_says_hello_fails_after_the_boot_timeout(mux, asked, stage):
    """The message says how far the boot came."""
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, FakeVm(),
                            mux.signals, Plan(options=Options(boot_timeout=1)))
    if asked:
        mux.guest.send(wire.INIT)
    with pytest.raises(DkvmError) as info:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            supervisor.step(timeout=0.1)
    assert info.value.message.startswith(
        f"the VM did not start the workload within 1s (DKVM_BOOT_TIMEOUT; {stage}")


@pytest.mark.parametrize("after_exit", [False, True])
def test_virtiofsd_dying_is_an_error_until_the_status_is_in(mux, after_exit):
    """Once the guest has reported, the VM is going: virtiofsd leaves when QEMU does,
    and SIGCHLD for it must not turn a clean exit into an error."""
    vm = FakeVm()

    def scenario(guest, connect_relay):
        guest.send(HELLO)
        if after_exit:
            guest.send(EXIT, {"status": 0})
            assert guest.recv() == Frame(EXIT_ACK)
        vm.helper_dead = True
        os.kill(os.getpid(), signal.SIGCHLD)
        if after_exit:      # taken (signals come first in a turn), and still serving
            guest.send(EXIT, {"status": 0})
            assert guest.recv() == Frame(EXIT_ACK)
            vm.running = False
        assert mux.returned.wait(WAIT)

    result = mux(scenario, vm)
    if after_exit:
        assert result == 0
    else:
        assert isinstance(result, DkvmError) and "virtiofsd exited" in result.message


def test_the_vm_ending_without_a_status_is_an_error_naming_qemus_end(mux):
    vm = FakeVm()

    def scenario(guest, connect_relay):
        guest.send(HELLO)
        vm.running = False
        assert mux.returned.wait(WAIT)

    result = mux(scenario, vm)
    assert isinstance(result, DkvmError)
    assert "without reporting the workload's exit status (QEMU exit status 0)" in result.message


def test_free_channel_goes_round_and_skips_those_in_use():
    assert free_channel({}) == 1
    assert free_channel({1: None, 2: None}, 2) == 3
    assert free_channel({5: None}, 4) == 6
    assert free_channel({1: None}, 65535) == 2          # wraps, never to 0
    assert free_channel({}, 65535) == 1



def test_virtiofsd_near_its_descriptor_limit_has_the_guest_let_go_of_unused_inodes(mux):
    """Past 60% of its limit (after hello: the guest takes no frame
    before), the guest is asked, at most once per RELEASE_INTERVAL."""
    vm = FakeVm()
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, vm,
                            mux.signals, Plan())
    vm.descriptors = (19000, 20000)
    supervisor.step(timeout=0.01)                   # before hello: nothing
    supervisor.on_hello(Frame(HELLO))
    vm.descriptors = (12000, 20000)
    supervisor.next_descriptor_check = 0
    supervisor.step(timeout=0.01)
    with pytest.raises(AssertionError, match="no frame in time"):
        mux.guest.recv(timeout=QUIET)
    vm.descriptors = (12001, 20000)
    for _ in range(3):
        supervisor.next_descriptor_check = 0
        supervisor.step(timeout=0.01)
    assert mux.guest.recv() == Frame(wire.RELEASE)
    with pytest.raises(AssertionError, match="no frame in time"):
        mux.guest.recv(timeout=QUIET)               # not again within the interval
    supervisor.next_descriptor_check = supervisor.quiet_until = 0
    supervisor.step(timeout=0.01)
    assert mux.guest.recv() == Frame(wire.RELEASE)



def test_a_members_virtiofsd_near_its_limit_has_the_guest_let_go_too(mux):
    """A pod's sandbox: its members' virtiofsds count as its own does."""
    vm, exports = FakeVm(), MemberExports(monitor=None)
    exports.open_now = 100
    exports.most_descriptors_open = lambda: exports.open_now
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, vm,
                            mux.signals, Plan(), exports=exports)
    vm.descriptors = (100, 20000)
    supervisor.on_hello(Frame(HELLO))
    supervisor.step(timeout=0.01)
    with pytest.raises(AssertionError, match="no frame in time"):
        mux.guest.recv(timeout=QUIET)
    exports.open_now = 12001
    supervisor.next_descriptor_check = 0
    supervisor.step(timeout=0.01)
    assert mux.guest.recv() == Frame(wire.RELEASE)


def test_a_guest_silent_for_the_watchdog_after_hello_is_taken_for_hung(mux):
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, FakeVm(),
                            mux.signals, Plan(options=Options(watchdog=1)))
    supervisor.on_hello(Frame(HELLO))
    started = time.monotonic()
    with pytest.raises(DkvmError) as info:
        while time.monotonic() < started + WAIT:
            supervisor.step(timeout=0.1)
    assert 1 <= time.monotonic() - started < WAIT
    assert info.value.message.startswith(
        "the VM stopped answering: no word from its init for 1s (DKVM_WATCHDOG)")


def test_heartbeats_keep_the_watchdog_quiet_and_a_frozen_container_side_resets_it(mux):
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, FakeVm(),
                            mux.signals, Plan(options=Options(watchdog=2)))
    supervisor.on_hello(Frame(HELLO))
    for _ in range(8):                          # 4 s: beyond the watchdog, but beating
        mux.guest.send(wire.HEARTBEAT)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            supervisor.step(timeout=0.1)
    # `docker pause`: this process did not turn for longer than the watchdog
    supervisor.last_turn -= 10
    supervisor.last_heard -= 10
    supervisor.step(timeout=0.1)
    assert time.monotonic() - supervisor.last_heard < 1
