"""The control channel's three loops, driven by tests through socketpairs, without a
VM: the guest's loop (guest.loop.GuestLoop) and its exec sessions (flow control,
stdout/stderr apart, the exit status after the last byte, stdin and its EOF,
terminals, CLOSE, signals and resizes for the workload), the container side's
supervisor (held frames until HELLO, channels, CLOSE, malformed frames, signals,
EXIT/EXIT_ACK) and the exec relay (EXEC_START first, the stdin window, WINDOW
answers, the exit status).

Every wait here is bounded: a broken peer fails the test, it never hangs it."""
import fcntl
import hashlib
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from dkvm import wire
from waiting import wait_until
from dkvm.container import supervisor as supervisor_module
from dkvm.container.exec_relay import ExecRelay
from dkvm.container.signal_inbox import SignalInbox
from dkvm.container.supervisor import Supervisor, free_channel
from dkvm.errors import DkvmError
from dkvm.guest.loop import GuestLoop
from dkvm.roles.ctr_entrypoint import listen
from dkvm.schema import ExecStart, NetChange, NetStep, Options, Plan, Process
from dkvm.wire import (CLOSE, EXEC_EXIT, EXEC_START, EXIT, EXIT_ACK, HELLO, MAX_DATA,
                       RESIZE, SIGNAL, STDERR, STDIN, STDOUT, STREAM_WINDOW, WINDOW, Frame)

WAIT = 5            # the most any single expected event may take
QUIET = 0.25        # how long "nothing more happens" is watched for
CHANNEL = 7


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


# --- the guest side: GuestLoop and its ExecSession -------------------------------------

def fake_spawn(process, workload_pid, stdio):
    """spawn_in_workload without namespaces or a user switch: a session leader with
    `stdio` as 0-2 (and its controlling terminal, for a terminal), exec'ing args."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setsid()
        if process.terminal:
            fcntl.ioctl(stdio[0], termios.TIOCSCTTY, 0)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        os.execvp(process.args[0], process.args)
    finally:
        os._exit(127)


def signal_from_another_process(sig):
    """As the engine signals the entrypoint: from another process (a signal a
    process sends itself is its own business, not the workload's)."""
    subprocess.run(["kill", f"-{int(sig)}", str(os.getpid())], check=True, timeout=WAIT)


def exit_status(wstatus):
    """As the guest's reap() reports it: the code, or 128+N for a signal."""
    code = os.waitstatus_to_exitcode(wstatus)
    return 128 - code if code < 0 else code


class GuestHarness:
    """The guest's real loop (guest.loop.GuestLoop), turn by turn, with the test as the
    relay at the other end of a socketpair. A reader thread takes every frame the
    loop sends and checks it on arrival: our channel, data frames of at most
    MAX_DATA, output within the window granted back so far, nothing after EXEC_EXIT.
    A writer thread sends the relay's frames, so that a full socket never blocks the
    thread that runs the loop."""

    def __init__(self, workload_args=("sleep", "300")):
        self.relay_end, self.guest_end = socket.socketpair()
        self.workload = subprocess.Popen(list(workload_args), stdout=subprocess.PIPE)
        self.children = {self.workload.pid}
        self.lock = threading.Lock()
        self.frames, self.problems = [], []
        self.acked = 0              # output bytes the fake relay has granted back
        self.exec_pid, self.exited, self.status = None, False, None   # the exec, as reaped
        self.most_buffered = 0      # the most stdin the session held at once
        self.session = None
        self.outbox = queue.Queue()
        self.reader = threading.Thread(target=self.read_frames, name="relay-reader", daemon=True)
        self.writer = threading.Thread(target=self.write_frames, name="relay-writer",
                                       daemon=True)
        self.reader.start()
        self.writer.start()
        self.loop = GuestLoop(self.guest_end.fileno(), self.workload.pid, reap=self.reap,
                              spawn_exec=self.spawn)

    def start_exec(self, args, terminal=False, winsize=()):
        self.send(EXEC_START, ExecStart(process=Process(args=args, terminal=terminal),
                                        winsize=list(winsize)))
        self.run_until(lambda: CHANNEL in self.loop.sessions or self.exits())
        self.session = self.loop.sessions.get(CHANNEL)
        return self

    # --- the loop's side
    def spawn(self, process, workload_pid, stdio):
        self.exec_pid = fake_spawn(process, workload_pid, stdio)
        self.children.add(self.exec_pid)
        return self.exec_pid

    def reap(self):
        statuses = {}
        for pid in list(self.children):
            done, wstatus = os.waitpid(pid, os.WNOHANG)
            if done:
                self.children.discard(pid)
                statuses[pid] = exit_status(wstatus)
        if self.exec_pid in statuses:
            self.exited, self.status = True, statuses[self.exec_pid]
        return statuses

    # --- the relay's side
    def read_frames(self):
        decoder = wire.Decoder()
        while True:
            try:
                data = self.relay_end.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            for frame in decoder.feed(data):
                self.check(frame)

    def check(self, frame):
        with self.lock:
            if frame.channel != CHANNEL:
                self.problems.append(f"frame on channel {frame.channel}: {frame}")
            if frame.type in (STDOUT, STDERR):
                if not 0 < len(frame.payload) <= MAX_DATA:
                    self.problems.append(f"data frame of {len(frame.payload)} bytes")
                if any(f.type == EXEC_EXIT for f in self.frames):
                    self.problems.append("data after EXEC_EXIT")
            self.frames.append(frame)
            if self.sent_output() - self.acked > STREAM_WINDOW:
                self.problems.append("output beyond the window")

    def write_frames(self):
        while True:
            data = self.outbox.get()
            if data is None:
                return
            try:
                self.relay_end.sendall(data)
            except OSError:
                return

    def send(self, ftype, payload=b"", channel=CHANNEL):
        self.outbox.put(wire.encode(ftype, payload, channel))

    def send_raw(self, data):
        self.outbox.put(data)

    def grant(self, n):
        """A WINDOW for `n` output bytes, as the relay sends after writing them."""
        with self.lock:
            self.acked += n
        self.send(WINDOW, {"bytes": n})

    def ack(self):
        """Grant back everything received."""
        with self.lock:
            unacked = self.sent_output() - self.acked
        if unacked:
            self.grant(unacked)

    # what the relay saw
    def received(self):
        with self.lock:
            return list(self.frames)

    def payload(self, ftype):
        return b"".join(f.payload for f in self.received() if f.type == ftype)

    def sent_output(self):
        return sum(len(f.payload) for f in self.frames if f.type in (STDOUT, STDERR))

    def windows(self):
        return sum(f.record().bytes for f in self.received() if f.type == WINDOW)

    def exits(self):
        return [f.record().status for f in self.received() if f.type == EXEC_EXIT]

    # --- driving the loop
    def step(self, timeout=0.02):
        self.loop.step(timeout)
        if self.session is not None:
            self.most_buffered = max(self.most_buffered, len(self.session.stdin_buf))
        assert not self.problems, self.problems

    def run_until(self, cond, auto_ack=False, timeout=WAIT, each=None):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, (
                f"timed out: {len(self.frames)} frames, output {self.sent_output()}, "
                f"acked {self.acked}, exited {self.exited}")
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

    def ended(self):
        return CHANNEL not in self.loop.sessions and self.session is not None

    def finish(self):
        self.run_until(lambda: self.ended() and self.exits(), auto_ack=True)
        self.idle(0.05)
        frames = self.received()
        assert frames[-1].type == EXEC_EXIT
        assert len(self.exits()) == 1
        return self.exits()[0]

    def close(self):
        """Never leave a process, an fd or a signal handler behind, even on failure."""
        if self.exec_pid and not self.exited:
            try:
                os.killpg(self.exec_pid, signal.SIGKILL)
            except OSError:
                pass
            os.waitpid(self.exec_pid, 0)
        self.workload.kill()
        self.workload.wait()
        self.workload.stdout.close()
        session = self.session
        if session is not None and not session.ended:
            for fd in {*session.outputs, session.stdin_fd} - {None}:
                os.close(fd)
        self.loop.close()
        self.outbox.put(None)
        self.writer.join(WAIT)
        self.relay_end.shutdown(socket.SHUT_RDWR)
        self.reader.join(WAIT)
        self.relay_end.close()
        self.guest_end.close()


@pytest.fixture
def guest():
    harnesses = []

    def start(args, terminal=False, winsize=()):
        harness = GuestHarness()
        harnesses.append(harness)
        return harness.start_exec(args, terminal, winsize)

    yield start
    for harness in harnesses:
        harness.close()


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
    g.grant(1000)
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


def test_an_output_ready_when_the_window_is_spent_stays_open(guest):
    """Both outputs poll readable, reading the first spends the window: the second
    must wait for a grant, not read 0 bytes, take that for its end and close (the
    process would die of EPIPE on its next write)."""
    g = guest(py("import sys, time; sys.stdout.write('o'); sys.stderr.write('e'); "
                 "sys.stdout.flush(); sys.stderr.flush(); time.sleep(0.5)"))
    g.session.credit = 0
    for fd in list(g.session.outputs):
        assert g.session.read_output(fd) is False
    assert sorted(g.session.outputs.values()) == sorted([STDOUT, STDERR])
    g.session.credit = STREAM_WINDOW
    assert g.finish() == 0
    assert (g.payload(STDOUT), g.payload(STDERR)) == (b"o", b"e")


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

    def __init__(self, harness, data):
        self.harness, self.data, self.sent, self.eof_sent = harness, data, 0, False
        self.stalled = False        # the window ran out at least once

    def credit(self):
        return STREAM_WINDOW - (self.sent - self.harness.windows())

    def __call__(self):
        assert 0 <= self.credit() <= STREAM_WINDOW
        while self.sent < len(self.data) and self.credit() > 0 and not self.harness.ended():
            n = min(MAX_DATA, self.credit(), len(self.data) - self.sent)
            self.harness.send(STDIN, self.data[self.sent:self.sent + n])
            self.sent += n
        if self.sent < len(self.data) and self.credit() == 0:
            self.stalled = True
        if self.sent == len(self.data) and not self.eof_sent:
            self.harness.send(STDIN, b"")
            self.eof_sent = True


def test_stdin_reaches_the_process_within_the_window_and_eof_ends_it(guest):
    data = os.urandom(4 * STREAM_WINDOW + 777)
    g = guest(["sh", "-c", "sleep 0.1; sha256sum"])     # starts late: the pipe fills
    relay = FakeRelayStdin(g, data)
    g.run_until(lambda: g.ended() and g.exits(), auto_ack=True, each=relay)
    assert g.exits() == [0]
    assert g.payload(STDOUT) == hashlib.sha256(data).hexdigest().encode() + b"  -\n"
    assert relay.eof_sent and relay.stalled
    g.run_until(lambda: g.windows() == len(data))   # every byte written was granted back
    assert g.most_buffered <= STREAM_WINDOW


def test_stdin_the_process_never_reads_is_still_granted_back(guest):
    data = os.urandom(2 * STREAM_WINDOW)
    g = guest(["sh", "-c", "head -c 5 >/dev/null; echo done"])
    relay = FakeRelayStdin(g, data)
    g.run_until(lambda: g.ended() and g.exits(), auto_ack=True, each=relay)
    assert g.exits() == [0]
    assert g.payload(STDOUT) == b"done\n"


def test_eof_on_stdin_without_data(guest):
    g = guest(["wc", "-c"])
    g.send(STDIN, b"")
    assert g.finish() == 0
    assert g.payload(STDOUT).strip() == b"0"


def test_terminal_session_output_size_resize_and_input(guest):
    g = guest(["sh", "-c", "stty size; read line; stty size; echo got:$line; "
                           "head -c 300000 /dev/zero | tr '\\0' y; echo; echo END"],
              terminal=True, winsize=[33, 101])
    g.run_until(lambda: b"33 101" in g.payload(STDOUT), auto_ack=True)
    g.send(RESIZE, {"rows": 40, "cols": 120})
    g.send(STDIN, b"hello\n")
    assert g.finish() == 0
    out = g.payload(STDOUT)
    assert g.payload(STDERR) == b""             # a terminal has one stream
    assert b"40 120" in out and b"got:hello" in out
    assert out.count(b"y") == 300000            # all of it, past the window, before EXIT
    assert out.endswith(b"END\r\n")
    g.run_until(lambda: g.windows() == len(b"hello\n"))


def test_terminal_eof_is_ctrl_d(guest):
    g = guest(["cat"], terminal=True)
    g.send(STDIN, b"abc\n")
    g.send(STDIN, b"")
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
    sent = len(g.received())
    g.send(CLOSE)
    g.run_until(lambda: g.ended() and g.exited)
    g.idle(0.1)
    assert g.status == 128 + signal.SIGKILL
    assert g.received()[sent:] == []        # nothing more for a relay that is gone
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
    # the relay's reader has taken all the window's output (it reads in a thread)
    wait_until(lambda: g.sent_output() == STREAM_WINDOW, "the window's output to arrive",
               timeout=WAIT, interval=0.01)
    sent = len(g.received())
    g.send(CLOSE)
    g.run_until(lambda: g.ended() and g.exited)    # no acks: nobody is there to send them
    g.idle(0.1)
    assert g.status == (0 if close_after_exit else 128 + signal.SIGKILL)
    assert g.received()[sent:] == []
    assert g.session.outputs == {} and g.session.stdin_fd is None


# --- the guest loop's own frames: the workload, resizes, bad frames ----------------

def control_frames(harness, ftype, **kw):
    return [f for f in harness.received() if f.type == ftype]


def test_a_signal_frame_reaches_the_workload_and_its_exit_ends_the_loop():
    harness = GuestHarness(["sh", "-c", 'trap "exit 3" USR1; echo up; while :; do sleep 0.05; done'])
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


# --- the container side: the supervisor ------------------------------------------------

def exec_start(name):
    return ExecStart(process=Process(args=[name]))


class FakeVm:
    """The VM's processes as the supervisor sees them: QEMU runs until `running` is
    false; virtiofsd dies when `helper_dead` is set."""

    def __init__(self):
        self.running, self.helper_dead = True, False

    def check(self, helpers_only=False):
        if self.helper_dead:
            raise DkvmError("virtiofsd exited unexpectedly")

    def ended(self):
        return not self.running

    def wait(self, timeout):
        pass

    def exit_reason(self):
        return " (QEMU exit status 0)"

    def release_kernel_image(self, boot):
        self.kernel_released = True

    descriptors = (0, 0)

    def virtiofsd_descriptors(self):
        return self.descriptors


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
    """Runs the supervisor in this (the main) thread against a scenario played in a
    helper thread by the guest and relays; returns its status or error."""
    listener = listen(str(tmp_path / "exec.sock"), backlog=64)
    control, guest_end = socket.socketpair()
    network_changes, network_follower = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    opened = [Peer(guest_end)]
    signals = SignalInbox()

    def connect_relay():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT)
        sock.connect(str(tmp_path / "exec.sock"))
        opened.append(Peer(sock))
        return opened[-1]

    returned = threading.Event()    # the supervisor has returned (for the scenario)

    def run(scenario, vm=None, plan=None):
        failures = []

        def body():
            try:
                scenario(opened[0], connect_relay)
            except BaseException as err:  # reported in the main thread
                failures.append(err)
            finally:
                for peer in opened:     # the supervisor sees the guest go: it returns
                    peer.close()

        supervisor = Supervisor(control, listener, network_changes, vm or FakeVm(), signals,
                                plan or Plan())
        thread = threading.Thread(target=body, name="mux-scenario", daemon=True)
        thread.start()
        try:
            result = supervisor.run()
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
    run.control, run.guest, run.listener, run.network_changes, run.signals = (
        control, opened[0], listener, network_changes, signals)
    yield run
    signals.close()
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


def test_a_guest_that_never_says_hello_fails_after_the_boot_timeout(mux):
    supervisor = Supervisor(mux.control, mux.listener, mux.network_changes, FakeVm(),
                            mux.signals, Plan(options=Options(boot_timeout=1)))
    with pytest.raises(DkvmError) as info:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            supervisor.step(timeout=0.1)
    assert info.value.message.startswith(
        "the VM did not start the workload within 1s (DKVM_BOOT_TIMEOUT)")


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


# --- the relay: container.exec_relay.ExecRelay -----------------------------------------

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
    """ExecRelay in this thread against `guest_scenario(peer)` in another."""
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
        status = ExecRelay(mine, request).run()
    finally:
        thread.join(WAIT * 4)
        mine.close()
    assert not thread.is_alive()
    if failures:
        raise failures[0]
    return status


REQUEST = Process(args=["cat"], env=["A=1"], cwd="/", uid=0, gid=0)


def test_relay_sends_the_terminal_size_when_it_changes(capfdbinary):
    master, slave = os.openpty()
    saved = os.dup(0)
    os.dup2(slave, 0)
    mine, theirs = socket.socketpair()
    guest = Peer(theirs)
    failures = []

    def scenario():
        try:
            start = guest.recv()
            assert start.record().winsize == [24, 80]
            os.set_blocking(master, True)
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
            os.kill(os.getpid(), signal.SIGWINCH)
            frame = guest.recv()
            assert (frame.type, frame.record().as_dict()) == (RESIZE, {"rows": 50, "cols": 132})
            guest.send(EXEC_EXIT, {"status": 0})
        except BaseException as err:
            failures.append(err)

    try:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        relay = ExecRelay(mine, Process(args=["sh"], terminal=True), [24, 80])
        relay.watch_resizes()
        thread = threading.Thread(target=scenario, daemon=True)
        thread.start()
        assert relay.run() == 0
        thread.join(WAIT)
        assert not failures, failures
        assert signal.SIGWINCH not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # restored
    finally:
        os.dup2(saved, 0)
        for fd in (saved, master, slave):
            os.close(fd)
        mine.close()
        theirs.close()


def test_relay_streams_within_the_window_and_returns_the_status(stdin_pipe, capfdbinary):
    data = os.urandom(3 * STREAM_WINDOW + 4321)
    out, err = pattern(200000, b"out"), pattern(70000, b"err")
    stdin_pipe.feed(data)

    def guest(peer):
        start = peer.recv()
        assert start.type == EXEC_START and start.record() == ExecStart(process=REQUEST)
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
        assert [(f.type, f.record().bytes) for f in grants] == [(WINDOW, n) for n in sizes]
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


@pytest.mark.parametrize("request_unread", [False, True])
def test_a_refused_relay_fails_with_the_supervisors_line_and_126(capfdbinary, request_unread):
    """Beyond the plan's max_execs: the exec fails at once as runc's failed execs do
    (126), saying why, whether or not the supervisor read the request before closing
    (unread, the relay's socket is reset: what was sent to it is still read)."""
    mine, theirs = socket.socketpair()
    message = "too many concurrent execs in this container (at most 24); ..."
    if not request_unread:
        mine.sendall(wire.encode(EXEC_START, ExecStart(process=REQUEST)))
        theirs.recv(1 << 16)
    supervisor_module.refuse_relay(theirs, message)
    with pytest.raises(DkvmError) as info:
        ExecRelay(mine, REQUEST).run()
    mine.close()
    assert (info.value.message, info.value.exit_code) == (message, 126)
    assert b"VM stopped" not in capfdbinary.readouterr().err


def test_a_relay_gives_way_to_the_vm_when_memory_runs_out():
    """A relay's oom_score_adj is the highest: if the container's limit ever runs out,
    the kernel takes an exec, never QEMU (raising it needs no capability)."""
    script = ("from dkvm.container.exec_relay import yield_to_the_vm; yield_to_the_vm(); "
              "print(open('/proc/self/oom_score_adj').read().strip())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=WAIT, check=True, cwd=os.path.dirname(os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout == "1000\n"


@pytest.mark.parametrize("pending", [60000, 4 * STREAM_WINDOW])
def test_relay_returns_137_when_the_vm_goes_with_stdin_unread(stdin_pipe, capfdbinary,
                                                              pending):
    """The far end closes without reading what the relay sent (a reset, not a clean
    end of stream), or while the relay is still sending (a broken pipe)."""
    stdin_pipe.feed(os.urandom(pending))

    def guest(peer):
        # read nothing: once the relay has sent, the guest goes with its stdin unread
        assert select.select([peer.sock], [], [], WAIT)[0]

    assert run_relay(REQUEST, guest) == 137
    assert b"the VM stopped before the exec ended" in capfdbinary.readouterr().err



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
                            mux.signals, Plan(options=Options(watchdog=1)))
    supervisor.on_hello(Frame(HELLO))
    for _ in range(6):                          # 3 s: beyond the watchdog, but beating
        mux.guest.send(wire.HEARTBEAT)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            supervisor.step(timeout=0.1)
    # `docker pause`: this process did not turn for longer than the watchdog
    supervisor.last_turn -= 10
    supervisor.last_heard -= 10
    supervisor.step(timeout=0.1)
    assert time.monotonic() - supervisor.last_heard < 1
