"""`docker exec`'s control channel, piece by piece and without a VM: the guest's
ExecSession (flow control, stdout/stderr apart, the exit status after the last byte,
stdin and its EOF, terminals, CLOSE), the container side's multiplexer `supervise`
(held frames until HELLO, channels, CLOSE, malformed frames, EXIT/EXIT_ACK) and the
exec relay (EXEC_START first, the stdin window, WINDOW answers, the exit status).

Every wait here is bounded: a broken peer fails the test, it never hangs it."""
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import sys
import termios
import threading
import time

import pytest

from dkvm import guest_exec, wire
from dkvm.errors import DkvmError
from dkvm.roles import ctr_entrypoint, exec_relay
from dkvm.wire import (CLOSE, EXEC_EXIT, EXEC_START, EXIT, EXIT_ACK, HELLO, MAX_DATA,
                       RESIZE, SIGNAL, STDERR, STDIN, STDOUT, STREAM_WINDOW, WINDOW, Frame)

WAIT = 5            # the most any single expected event may take
QUIET = 0.25        # how long "nothing more happens" is watched for
CHANNEL = 7


def window(n, channel=CHANNEL):
    return Frame(WINDOW, channel, json.dumps({"bytes": n}).encode())


def pattern(n, tag=b""):
    """`n` bytes in which every position is distinct enough to catch a lost,
    repeated or reordered chunk."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"%s%08d\n" % (tag, i)
        i += 1
    return bytes(out[:n])


PATTERN_SRC = ("def pattern(n, tag=b''):\n"
               "    out = bytearray(); i = 0\n"
               "    while len(out) < n:\n"
               "        out += b'%s%08d\\n' % (tag, i); i += 1\n"
               "    return bytes(out[:n])\n")


def py(body):
    """argv running `body` (with `pattern` defined) in this Python."""
    return [sys.executable, "-c", PATTERN_SRC + body]


# --- the guest side: ExecSession -------------------------------------------------------

def fake_spawn(request, workload_pid, stdio, use_tty):
    """spawn_in_workload without namespaces or a user switch: a session leader with
    `stdio` as 0-2 (and its controlling terminal, for a terminal), exec'ing args."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setsid()
        if use_tty:
            fcntl.ioctl(stdio[0], termios.TIOCSCTTY, 0)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        os.execvp(request["args"][0], request["args"])
    finally:
        os._exit(127)


def exit_status(wstatus):
    """As the guest's reap() reports it: the code, or 128+N for a signal."""
    code = os.waitstatus_to_exitcode(wstatus)
    return 128 - code if code < 0 else code


class GuestLoop:
    """vm_init's main loop for one session: reap, select on the session's fds,
    write stdin / read output; frames the session sends are decoded into `frames`.
    It checks, on every data frame sent, that the relay's window is respected."""

    def __init__(self, request):
        self.decoder = wire.Decoder()
        self.frames = []
        self.acked = 0              # output bytes the fake relay has acknowledged
        self.exited = False
        self.status = None          # as reaped
        self.session = guest_exec.ExecSession(CHANNEL, request, 1, self.send)

    def send(self, data):
        frames = self.decoder.feed(data)
        for frame in frames:
            assert frame.channel == CHANNEL, frame
            if frame.type in (STDOUT, STDERR):
                assert 0 < len(frame.payload) <= MAX_DATA
                assert not any(f.type == EXEC_EXIT for f in self.frames), "data after EXEC_EXIT"
        self.frames += frames
        assert self.sent_output() - self.acked <= STREAM_WINDOW, "output beyond the window"

    # what the fake relay saw
    def payload(self, ftype):
        return b"".join(f.payload for f in self.frames if f.type == ftype)

    def sent_output(self):
        return sum(len(f.payload) for f in self.frames if f.type in (STDOUT, STDERR))

    def windows(self):
        return sum(f.json()["bytes"] for f in self.frames if f.type == WINDOW)

    def exits(self):
        return [f.json()["status"] for f in self.frames if f.type == EXEC_EXIT]

    def ack(self):
        """Grant back everything received, as the relay does after writing it."""
        unacked = self.sent_output() - self.acked
        if unacked:
            self.acked += unacked
            self.session.on_frame(window(unacked))

    def step(self, timeout=0.02):
        session = self.session
        if not self.exited:
            pid, wstatus = os.waitpid(session.pid, os.WNOHANG)
            if pid:
                self.exited = True
                self.status = exit_status(wstatus)
                session.on_exit(self.status)
        if session.ended:
            return
        ready_r, ready_w, _ = select.select(session.readable_fds(), session.writable_fds(),
                                            [], timeout)
        for fd in ready_w:
            session.write_stdin()
        for fd in ready_r:
            if fd in session.outputs:
                session.read_output(fd)

    def run_until(self, cond, auto_ack=False, timeout=WAIT, each=None):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, (
                f"timed out: {len(self.frames)} frames, output {self.sent_output()}, "
                f"acked {self.acked}, credit {self.session.credit}, exited {self.exited}")
            if each:
                each()
            self.step()
            if auto_ack:
                self.ack()

    def idle(self, seconds=QUIET):
        """Run the loop for a while when nothing is expected to change."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.step()

    def finish(self):
        self.run_until(lambda: self.session.ended, auto_ack=True)
        assert self.frames[-1].type == EXEC_EXIT
        assert len(self.exits()) == 1
        return self.exits()[0]


@pytest.fixture
def guest(monkeypatch):
    monkeypatch.setattr(guest_exec, "spawn_in_workload", fake_spawn)
    loops = []

    def start(args, **request):
        loop = GuestLoop(dict(request, args=args, env=[], uid=0, gid=0))
        loops.append(loop)
        return loop

    yield start
    for loop in loops:              # never leave a process or fds behind, even on failure
        session = loop.session
        if not loop.exited:
            try:
                os.killpg(session.pid, signal.SIGKILL)
            except OSError:
                pass
            os.waitpid(session.pid, 0)
        if not session.ended:
            for fd in {*session.outputs, session.stdin_fd} - {None}:
                os.close(fd)


def test_output_stalls_when_the_window_is_spent_and_resumes_on_window(guest):
    total = 3 * STREAM_WINDOW + 12345
    g = guest(py(f"import sys; sys.stdout.buffer.write(pattern({total}))"))
    g.run_until(lambda: len(g.payload(STDOUT)) >= STREAM_WINDOW)
    # exactly the window, then nothing: the process is held back, not its output dropped
    assert len(g.payload(STDOUT)) == STREAM_WINDOW
    assert g.session.credit == 0 and g.session.readable_fds() == []
    g.idle()
    assert len(g.payload(STDOUT)) == STREAM_WINDOW
    assert not g.exited and g.exits() == []
    # a partial grant lets exactly that much through
    g.acked += 1000
    g.session.on_frame(window(1000))
    g.run_until(lambda: len(g.payload(STDOUT)) >= STREAM_WINDOW + 1000)
    g.idle()
    assert len(g.payload(STDOUT)) == STREAM_WINDOW + 1000
    # the rest, with the relay granting back what it got
    assert g.finish() == 0
    assert g.payload(STDOUT) == pattern(total)
    assert g.payload(STDERR) == b""


def test_stdout_and_stderr_arrive_whole_and_apart_then_the_status(guest):
    n = 40
    g = guest(py("import sys, time\n"
                 f"for i in range({n}):\n"
                 "    sys.stdout.buffer.write(pattern(9000, b'o%d-' % i)); sys.stdout.flush()\n"
                 "    sys.stderr.buffer.write(pattern(7000, b'e%d-' % i)); sys.stderr.flush()\n"
                 "sys.exit(3)\n"))
    assert g.finish() == 3
    assert g.payload(STDOUT) == b"".join(pattern(9000, b"o%d-" % i) for i in range(n))
    assert g.payload(STDERR) == b"".join(pattern(7000, b"e%d-" % i) for i in range(n))
    assert g.windows() == 0         # no stdin, so nothing to acknowledge


def test_exit_status_waits_for_output_held_back_by_the_window(guest):
    """The process is gone with output still in its pipe: EXEC_EXIT must not pass it."""
    total = STREAM_WINDOW + 30000   # the tail fits in the pipe, so the process can exit
    g = guest(py(f"import sys; sys.stdout.buffer.write(pattern({total})); sys.exit(5)"))
    g.run_until(lambda: g.exited)
    g.idle()
    assert len(g.payload(STDOUT)) == STREAM_WINDOW
    assert g.exits() == [] and not g.session.ended
    assert g.finish() == 5
    assert g.payload(STDOUT) == pattern(total)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_death_is_reported_as_128_plus_n(guest, sig):
    g = guest(["sh", "-c", f"echo partial; echo oops >&2; kill -{sig.name[3:]} $$"])
    assert g.finish() == 128 + sig
    assert g.payload(STDOUT) == b"partial\n"
    assert g.payload(STDERR) == b"oops\n"


class FakeRelayStdin:
    """Sends `data` as the relay does: MAX_DATA frames within the window the
    session grants back, then an empty frame for EOF."""

    def __init__(self, loop, data):
        self.loop, self.data, self.sent, self.eof_sent = loop, data, 0, False
        self.stalled = False        # the window ran out at least once
        self.most_buffered = 0

    def credit(self):
        return STREAM_WINDOW - (self.sent - self.loop.windows())

    def __call__(self):
        session = self.loop.session
        assert 0 <= self.credit() <= STREAM_WINDOW
        while self.sent < len(self.data) and self.credit() > 0 and not session.ended:
            n = min(MAX_DATA, self.credit(), len(self.data) - self.sent)
            session.on_frame(Frame(STDIN, CHANNEL, self.data[self.sent:self.sent + n]))
            self.sent += n
            self.most_buffered = max(self.most_buffered, len(session.stdin_buf))
        if self.sent < len(self.data) and self.credit() == 0:
            self.stalled = True
        if self.sent == len(self.data) and not self.eof_sent:
            session.on_frame(Frame(STDIN, CHANNEL, b""))
            self.eof_sent = True


def test_stdin_reaches_the_process_within_the_window_and_eof_ends_it(guest):
    data = os.urandom(4 * STREAM_WINDOW + 777)
    g = guest(["sh", "-c", "sleep 0.1; sha256sum"])     # starts late: the pipe fills
    relay = FakeRelayStdin(g, data)
    g.run_until(lambda: g.session.ended, auto_ack=True, each=relay)
    assert g.exits() == [0]
    assert g.payload(STDOUT) == hashlib.sha256(data).hexdigest().encode() + b"  -\n"
    assert relay.eof_sent and relay.stalled
    assert g.windows() == len(data)     # every byte written was granted back
    assert relay.most_buffered <= STREAM_WINDOW


def test_stdin_the_process_never_reads_is_still_granted_back(guest):
    data = os.urandom(2 * STREAM_WINDOW)
    g = guest(["sh", "-c", "head -c 5 >/dev/null; echo done"])
    relay = FakeRelayStdin(g, data)
    g.run_until(lambda: g.session.ended, auto_ack=True, each=relay)
    assert g.exits() == [0]
    assert g.payload(STDOUT) == b"done\n"


def test_eof_on_stdin_without_data(guest):
    g = guest(["wc", "-c"])
    g.session.on_frame(Frame(STDIN, CHANNEL, b""))
    assert g.finish() == 0
    assert g.payload(STDOUT).strip() == b"0"


def test_terminal_session_output_size_resize_and_input(guest):
    g = guest(["sh", "-c", "stty size; read line; stty size; echo got:$line; "
                           "head -c 300000 /dev/zero | tr '\\0' y; echo; echo END"],
              terminal=True, winsize=[33, 101])
    g.run_until(lambda: b"33 101" in g.payload(STDOUT), auto_ack=True)
    g.session.on_frame(Frame(RESIZE, CHANNEL, b'{"rows":40,"cols":120}'))
    g.session.on_frame(Frame(STDIN, CHANNEL, b"hello\n"))
    assert g.finish() == 0
    out = g.payload(STDOUT)
    assert g.payload(STDERR) == b""             # a terminal has one stream
    assert b"40 120" in out and b"got:hello" in out
    assert out.count(b"y") == 300000            # all of it, past the window, before EXIT
    assert out.endswith(b"END\r\n")
    assert g.windows() == len(b"hello\n")


def test_terminal_eof_is_ctrl_d(guest):
    g = guest(["cat"], terminal=True)
    g.session.on_frame(Frame(STDIN, CHANNEL, b"abc\n"))
    g.session.on_frame(Frame(STDIN, CHANNEL, b""))
    assert g.finish() == 0
    assert g.payload(STDOUT).count(b"abc") == 2     # the echo and cat's copy


def test_terminal_closed_by_a_live_process_does_not_hang_it_up(guest):
    """A process may close its terminal and go on (GNU cat closes all of its stdio
    before it exits): the session must not hang it up (SIGHUP, 129) meanwhile."""
    g = guest(["sh", "-c", "echo bye; exec </dev/null >/dev/null 2>&1; sleep 0.3; exit 3"],
              terminal=True)
    g.run_until(lambda: g.session.hung_up)
    g.idle(0.1)                     # and no busy loop on the dead master meanwhile
    assert not g.exited
    assert g.finish() == 3
    assert g.payload(STDOUT) == b"bye\r\n"


@pytest.mark.parametrize("terminal", [False, True])
def test_close_kills_the_process_and_ends_the_session(guest, terminal):
    g = guest(["sh", "-c", "echo started; sleep 30 & sleep 30; echo never"], terminal=terminal)
    g.run_until(lambda: b"started" in g.payload(STDOUT), auto_ack=True)
    sent = len(g.frames)
    g.session.on_frame(Frame(CLOSE, CHANNEL))
    g.run_until(lambda: g.session.ended)
    assert g.status == 128 + signal.SIGKILL
    assert g.frames[sent:] == []        # nothing more for a relay that is gone
    assert g.session.outputs == {} and g.session.stdin_fd is None


@pytest.mark.parametrize("close_after_exit", [False, True])
def test_close_ends_the_session_even_with_the_window_spent(guest, close_after_exit):
    """The relay is gone, so no WINDOW will ever come: the session must still end
    (else the guest keeps it, and its pipes, forever)."""
    if close_after_exit:        # the process is gone, its output held back by the window
        g = guest(py(f"import sys; sys.stdout.buffer.write(pattern({STREAM_WINDOW + 30000}))"))
        g.run_until(lambda: g.exited)
    else:                       # the process is blocked on its full pipe
        g = guest(["yes"])
        g.run_until(lambda: g.session.credit == 0)
        g.idle(0.05)
    assert g.session.credit == 0 and not g.session.ended
    sent = len(g.frames)
    g.session.on_frame(Frame(CLOSE, CHANNEL))
    g.run_until(lambda: g.session.ended)       # no acks: nobody is there to send them
    assert g.status == (0 if close_after_exit else 128 + signal.SIGKILL)
    assert g.frames[sent:] == []
    assert g.session.outputs == {} and g.session.stdin_fd is None


# --- the container side: supervise -----------------------------------------------------

class FakeQemu:
    def poll(self):
        return None

    def wait(self, timeout=None):
        return None


class Peer:
    """A blocking socket speaking frames, every receive bounded."""

    def __init__(self, sock):
        self.sock = sock
        self.decoder = wire.Decoder()
        self.frames = []

    def send(self, ftype, payload=b"", channel=0):
        self.sock.sendall(wire.encode(ftype, payload, channel))

    def recv(self, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while not self.frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no frame in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                raise AssertionError("the peer closed")
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def quiet(self, seconds=QUIET):
        """Assert that nothing arrives for a while."""
        assert not self.frames, self.frames
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            return
        raise AssertionError(f"unexpected {self.decoder.feed(data) if data else 'EOF'}")

    def close(self):
        self.sock.close()


@pytest.fixture
def mux(tmp_path):
    """Runs supervise in this (the main) thread against a scenario played in a
    helper thread by the guest and relays; returns supervise's status or error."""
    saved = {sig: signal.getsignal(sig)
             for sig in ctr_entrypoint.FORWARDED_SIGNALS + [signal.SIGWINCH]}
    listener = ctr_entrypoint.listen(str(tmp_path / "exec.sock"), backlog=64)
    control, guest_end = socket.socketpair()
    network_changes, network_follower = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    opened = [Peer(guest_end)]

    def connect_relay():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT)
        sock.connect(str(tmp_path / "exec.sock"))
        opened.append(Peer(sock))
        return opened[-1]

    returned = threading.Event()    # supervise has returned (for the scenario)

    def run(scenario):
        failures = []

        def body():
            try:
                scenario(opened[0], connect_relay)
            except BaseException as err:  # reported in the main thread
                failures.append(err)
            finally:
                for peer in opened:     # supervise sees the guest go: it returns
                    peer.close()

        thread = threading.Thread(target=body, name="mux-scenario", daemon=True)
        thread.start()
        try:
            result = ctr_entrypoint.supervise(control, FakeQemu(), {}, False, None, listener,
                                              network_changes)
        except DkvmError as err:
            result = err
        finally:
            returned.set()
            thread.join(WAIT * 4)
        assert not thread.is_alive(), "the scenario did not finish"
        if failures:
            raise failures[0]
        return result

    run.returned = returned
    run.network_follower = network_follower
    yield run
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    for peer in opened:
        peer.close()
    control.close()
    listener.close()
    network_changes.close()
    network_follower.close()


def test_supervise_multiplexes_exec_relays(mux, capsys):
    channels = {}

    def scenario(guest, connect_relay):
        relays = {}
        for name in "abcd":
            relays[name] = connect_relay()
            relays[name].send(EXEC_START, {"args": [name]}, channel=99)  # the channel is ours
        relays.pop("d").close()             # gone before the guest is even up
        # nothing reaches the guest before it says hello: it could not take it yet
        guest.quiet()
        guest.send(HELLO)
        frames = [guest.recv() for _ in range(5)]
        starts = [f for f in frames if f.type == EXEC_START]
        for frame in starts:
            channels[frame.json()["args"][0]] = frame.channel
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

        # the workload's exit: acknowledged, and supervise ends when the guest goes
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
        relay.send(EXEC_START, {"args": ["x"]})
        guest.send(HELLO)
        assert guest.recv().type == EXEC_START      # supervise's loop, and handlers, are up
        os.kill(os.getpid(), signal.SIGUSR1)
        frame = guest.recv()
        assert (frame.type, frame.json()) == (SIGNAL, {"signal": signal.SIGUSR1})
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == Frame(EXIT_ACK)

    assert mux(scenario) == 0


def test_supervise_passes_network_changes_on_after_hello(mux):
    change = {"add": [], "routes_del": [], "routes_add": [{"dev": "eth1", "dst_len": 0}]}

    def scenario(guest, connect_relay):
        mux.network_follower.send(wire.encode(wire.NET, change))
        guest.quiet()                               # held: the guest is not up yet
        guest.send(HELLO)
        frame = guest.recv()
        assert (frame.type, frame.json()) == (wire.NET, change)
        mux.network_follower.send(wire.encode(wire.NET, {**change, "add": [{"name": "eth2"}]}))
        assert guest.recv().json()["add"] == [{"name": "eth2"}]
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == Frame(EXIT_ACK)

    assert mux(scenario) == 0


def test_supervise_returns_after_grace_if_the_guest_stays(mux, monkeypatch):
    monkeypatch.setattr(ctr_entrypoint, "EXIT_GRACE", 0.3)

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
        first.send(EXEC_START, {"args": ["first"]})
        old = guest.recv().channel
        first.close()
        assert guest.recv() == Frame(CLOSE, old)
        second = connect_relay()
        second.send(EXEC_START, {"args": ["second"]})
        start = guest.recv()
        assert start.json()["args"] == ["second"] and start.channel != old
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


def test_free_channel_goes_round_and_skips_those_in_use():
    free_channel = ctr_entrypoint.free_channel
    assert free_channel({}) == 1
    assert free_channel({1: None, 2: None}, 2) == 3
    assert free_channel({5: None}, 4) == 6
    assert free_channel({1: None}, 65535) == 2          # wraps, never to 0
    assert free_channel({}, 65535) == 1


# --- the relay: exec_relay.relay -------------------------------------------------------

class StdinPipe:
    """A pipe standing in for the relay's fd 0; `feed` hands the write end to a
    thread that writes `data` and then closes it (EOF)."""

    def __init__(self):
        self.saved = os.dup(0)
        r, self.w = os.pipe()
        os.dup2(r, 0)
        os.close(r)
        self.feeder = None

    def feed(self, data):
        w, self.w = self.w, None

        def body():
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view):]
            except OSError:
                pass
            finally:
                os.close(w)
        self.feeder = threading.Thread(target=body, name="stdin-feeder", daemon=True)
        self.feeder.start()

    def close_writer(self):
        if self.w is not None:
            os.close(self.w)
            self.w = None

    def restore(self):
        os.dup2(self.saved, 0)      # the last read end: a blocked feeder gets EPIPE
        os.close(self.saved)
        if self.feeder:
            self.feeder.join(WAIT)
            assert not self.feeder.is_alive()
        self.close_writer()


@pytest.fixture
def stdin_pipe():
    pipe = StdinPipe()
    yield pipe
    pipe.restore()


def run_relay(request, guest_scenario):
    """exec_relay.relay in this thread against `guest_scenario(peer)` in another."""
    mine, theirs = socket.socketpair()
    guest = Peer(theirs)
    failures = []

    def body():
        try:
            guest_scenario(guest)
        except BaseException as err:
            failures.append(err)
        finally:
            guest.close()           # the relay sees the end: it cannot hang

    thread = threading.Thread(target=body, name="fake-guest", daemon=True)
    thread.start()
    try:
        status = exec_relay.relay(mine, request)
    finally:
        thread.join(WAIT * 4)
        mine.close()
    assert not thread.is_alive()
    if failures:
        raise failures[0]
    return status


REQUEST = {"args": ["cat"], "env": ["A=1"], "cwd": "/", "uid": 0, "gid": 0}


def test_relay_streams_within_the_window_and_returns_the_status(stdin_pipe, capfdbinary):
    data = os.urandom(3 * STREAM_WINDOW + 4321)
    out, err = pattern(200000, b"out"), pattern(70000, b"err")
    stdin_pipe.feed(data)

    def guest(peer):
        start = peer.recv()
        assert start.type == EXEC_START and start.json() == REQUEST
        got = bytearray()
        # no grant yet: exactly the window, then the relay waits
        while len(got) < STREAM_WINDOW:
            frame = peer.recv()
            assert frame.type == STDIN and 0 < len(frame.payload) <= MAX_DATA
            got += frame.payload
        assert len(got) == STREAM_WINDOW
        peer.quiet()
        # a small grant: exactly that much more
        peer.send(WINDOW, {"bytes": 100})
        frame = peer.recv()
        assert (frame.type, len(frame.payload)) == (STDIN, 100)
        got += frame.payload
        peer.quiet(0.1)
        # then grant back whatever arrives, until EOF
        peer.send(WINDOW, {"bytes": len(got) - 100})
        acked = len(got)
        while True:
            frame = peer.recv()
            assert frame.type == STDIN
            assert len(got) + len(frame.payload) - acked <= STREAM_WINDOW
            if not frame.payload:
                break
            got += frame.payload
            peer.send(WINDOW, {"bytes": len(frame.payload)})
            acked += len(frame.payload)
        assert bytes(got) == data
        # output: written to fds 1 and 2, each frame granted back
        sizes = []
        for ftype, stream in ((STDOUT, out), (STDERR, err)):
            for i in range(0, len(stream), MAX_DATA):
                peer.send(ftype, stream[i:i + MAX_DATA])
                sizes.append(len(stream[i:i + MAX_DATA]))
        grants = [peer.recv() for _ in sizes]
        assert [(f.type, f.json()["bytes"]) for f in grants] == [(WINDOW, n) for n in sizes]
        peer.send(EXEC_EXIT, {"status": 7})
        peer.quiet(0.1)

    assert run_relay(REQUEST, guest) == 7
    captured = capfdbinary.readouterr()
    assert captured.out == out
    assert captured.err == err


def test_relay_empty_stdin_sends_eof(stdin_pipe, capfdbinary):
    stdin_pipe.close_writer()

    def guest(peer):
        assert peer.recv().type == EXEC_START
        assert peer.recv() == Frame(STDIN, 0, b"")
        peer.quiet(0.1)                 # EOF is sent once
        peer.send(EXEC_EXIT, {"status": 0})

    assert run_relay(REQUEST, guest) == 0


def test_relay_returns_137_when_the_vm_goes_first(stdin_pipe, capfdbinary):
    def guest(peer):
        assert peer.recv().type == EXEC_START
        peer.send(STDOUT, b"partial")
        assert peer.recv().type == WINDOW

    assert run_relay(REQUEST, guest) == 137
    captured = capfdbinary.readouterr()
    assert captured.out == b"partial"
    assert b"the VM stopped before the exec ended" in captured.err


@pytest.mark.parametrize("pending", [60000, 4 * STREAM_WINDOW])
def test_relay_returns_137_when_the_vm_goes_with_stdin_unread(stdin_pipe, capfdbinary,
                                                              pending):
    """The far end closes without reading what the relay sent (a reset, not a clean
    end of stream), or while the relay is still sending (a broken pipe)."""
    stdin_pipe.feed(os.urandom(pending))

    def guest(peer):
        time.sleep(0.2)                 # read nothing: the relay's stdin stays unread

    assert run_relay(REQUEST, guest) == 137
    assert b"the VM stopped before the exec ended" in capfdbinary.readouterr().err

