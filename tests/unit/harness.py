"""What the unit tests of the control channel share: a guest loop run in this process
(GuestHarness, the `guest` fixture), a stand-in for the VM's processes (FakeVm), a
framed peer (Peer), the supervisor run against a scenario (the `mux` fixture), and
data that catches lost, repeated or reordered bytes (pattern). Every wait is bounded:
a broken peer fails the test, it never hangs it."""
import fcntl
import os
import queue
import signal
import socket
import subprocess
import sys
import termios
import threading
import time

import pytest

from dkvm import wire
from dkvm.container.signal_inbox import SignalInbox
from dkvm.container.supervisor import Supervisor
from dkvm.errors import DkvmError
from dkvm.guest.loop import GuestLoop
from dkvm.roles.ctr_entrypoint import listen
from dkvm.schema import ExecStart, Plan, Process
from dkvm.wire import EXEC_EXIT, EXEC_START, MAX_DATA, STDERR, STDOUT, STREAM_WINDOW, WINDOW


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

    def __init__(self, workload_args=("sleep", "300"), pod_members=None):
        self.relay_end, self.guest_end = socket.socketpair()
        self.workload = subprocess.Popen(list(workload_args), stdout=subprocess.PIPE)
        self.children = {self.workload.pid}
        self.lock = threading.Lock()
        self.frames, self.problems = [], []
        self.acked = 0              # output bytes the fake relay has granted back
        self.exec_pid, self.exited, self.status = None, False, None   # the exec, as reaped
        self.most_buffered = 0      # the most stdin the session held at once
        self.session = None
        self.other_channels, self.others = set(), []
        self.outbox = queue.Queue()
        self.reader = threading.Thread(target=self.read_frames, name="relay-reader", daemon=True)
        self.writer = threading.Thread(target=self.write_frames, name="relay-writer",
                                       daemon=True)
        self.reader.start()
        self.writer.start()
        extra = {"pod_members": pod_members} if pod_members else {}
        self.loop = GuestLoop(self.guest_end.fileno(), self.workload.pid, reap=self.reap,
                              spawn_exec=self.spawn, **extra)

    def start_exec(self, args, terminal=False, winsize=()):
        self.send(EXEC_START, ExecStart(process=Process(args=args, terminal=terminal),
                                        winsize=list(winsize)))
        self.run_until(lambda: CHANNEL in self.loop.sessions or self.exits())
        self.session = self.loop.sessions.get(CHANNEL)
        return self

    def start_forward(self, port):
        """A port-forward's session (guest.port_forward), to localhost:port."""
        self.send(EXEC_START, ExecStart(port=port))
        self.run_until(lambda: CHANNEL in self.loop.sessions or self.exits())
        self.session = self.loop.sessions.get(CHANNEL)
        return self

    # --- the loop's side
    def spawn(self, process, workload_pid, stdio, fork=None):
        self.exec_pid = fake_spawn(process, workload_pid, stdio)
        self.exec_target = workload_pid     # whose namespaces it would have joined
        self.exec_forked_in_member = fork is not None
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
            if frame.channel in self.other_channels:    # another session's: kept apart
                self.others.append(frame)
                return
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


def against_scenario(supervisor, play, peers, name, returned=None):
    """supervisor.run() in this (the main) thread while `play()` runs in another, which
    closes every peer when it is done (the supervisor sees the guest go: it returns);
    the supervisor's status or error. `returned` is set once it has returned; the
    scenario's failure is raised here."""
    failures = []

    def body():
        try:
            play()
        except BaseException as err:      # reported in the main thread
            failures.append(err)
        finally:
            for peer in peers:
                peer.close()

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    try:
        result = supervisor.run()
    except DkvmError as err:
        result = err
    finally:
        if returned is not None:
            returned.set()
        thread.join(WAIT * 4)
    assert not thread.is_alive(), "the scenario did not finish"
    if failures:
        raise failures[0]
    return result


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
        supervisor = Supervisor(control, listener, network_changes, vm or FakeVm(), signals,
                                plan or Plan())
        return against_scenario(supervisor, lambda: scenario(opened[0], connect_relay),
                                opened, "mux-scenario", returned)

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
