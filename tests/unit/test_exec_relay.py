"""container.exec_relay.ExecRelay: EXEC_START first, the stdin window, WINDOW answers,
terminal sizes, the exit status, and the VM or the supervisor going first."""
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading

import pytest

from harness import WAIT, Peer, pattern
from dkvm import wire
from dkvm.container import supervisor as supervisor_module
from dkvm.container.exec_relay import ExecRelay
from dkvm.errors import DkvmError
from dkvm.schema import ExecStart, Process
from dkvm.wire import (EXEC_EXIT, EXEC_START, MAX_DATA, RESIZE, STDERR, STDIN, STDOUT,
                       STREAM_WINDOW, WINDOW, Frame)


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
