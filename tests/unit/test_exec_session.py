"""guest.exec_session: one `docker exec` in the guest, driven through the guest's loop
over a socketpair: flow control, stdout and stderr apart, the exit status after the
last byte, stdin and its EOF, terminals, CLOSE."""
import hashlib
import os
import select
import signal

import pytest

from harness import WAIT, pattern, py
from waiting import wait_until
from dkvm.wire import CLOSE, MAX_DATA, RESIZE, STDERR, STDIN, STDOUT, STREAM_WINDOW


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
    g = guest(py("import sys; sys.stdout.write('o'); sys.stderr.write('e'); "
                 "sys.stdout.flush(); sys.stderr.flush(); sys.stdin.read()"))  # alive till EOF
    fds = set(g.session.outputs)
    wait_until(lambda: set(select.select(list(fds), [], [], 0)[0]) == fds,
               "both outputs to be readable", timeout=WAIT, interval=0.01)
    g.session.credit = 0
    for fd in list(g.session.outputs):
        assert g.session.read_output(fd) is False
    assert sorted(g.session.outputs.values()) == sorted([STDOUT, STDERR])
    g.session.credit = STREAM_WINDOW
    g.send(STDIN, b"")
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


def held_until(go):
    """A shell line that holds the process until the test creates the file `go`: a
    handshake where a sleep would race the test."""
    return f'while [ ! -e "{go}" ]; do sleep 0.01; done'


def test_stdin_reaches_the_process_within_the_window_and_eof_ends_it(guest, tmp_path):
    data = os.urandom(4 * STREAM_WINDOW + 777)
    go = tmp_path / "go"
    g = guest(["sh", "-c", f"{held_until(go)}; sha256sum"])     # reads late: the pipe fills

    relay = FakeRelayStdin(g, data)

    def relay_then_read():
        relay()
        if relay.stalled:                   # the window is spent: now the process reads
            go.touch()
    g.run_until(lambda: g.ended() and g.exits(), auto_ack=True, each=relay_then_read)
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


def test_terminal_closed_by_a_live_process_does_not_hang_it_up(guest, tmp_path):
    """A process may close its terminal and go on (GNU cat closes all of its stdio
    before it exits): the session must not hang it up (SIGHUP, 129) meanwhile."""
    go = tmp_path / "go"
    g = guest(["sh", "-c", f"echo bye; exec </dev/null >/dev/null 2>&1; {held_until(go)}; "
                           "exit 3"], terminal=True)
    g.run_until(lambda: g.session.hung_up)
    g.idle(0.1)                     # and no busy loop on the dead master meanwhile
    assert not g.exited
    go.touch()
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
