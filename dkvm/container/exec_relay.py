"""One `docker exec`, relayed into the guest over the entrypoint's multiplexer: the
request, stdin (within the window the guest grants), stdout and stderr apart,
terminal resizes, and the guest process's exit status. A pod member's relay
(pod_member) is this one with another first frame and its signals passed on; a
port-forward's (port_forward) carries a connection's bytes instead of stdio.

The loop is an object so that a test drives it with a socketpair. It starts for
every exec, so it imports what it needs: `_socket` and `_signal` (the modules around
them import enum), the signalfd machinery only for a terminal."""
import os
import select
import _signal
import _socket
import time

from dkvm import log, terminal, wire
from dkvm.errors import DkvmError
from dkvm.schema import ExecStart

VM_GONE_STATUS = 137
EXEC_FAILED = 126           # runc's status for an exec it could not start
# Relays are what the container side may lose first if its memory limit runs out:
# never QEMU (raising one's own oom_score_adj needs no capability).
OOM_SCORE_ADJ = b"1000"


def yield_to_the_vm():
    """Make this relay, not QEMU, what the kernel's OOM killer takes in this container
    (the exec fails; the VM runs on). First thing at start: a relay takes its memory
    as it imports."""
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, OOM_SCORE_ADJ)
        finally:
            os.close(fd)
    except OSError:
        pass


def connect(path, timeout, what="exec"):
    """The multiplexer's socket; a VM still booting has none yet: wait, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise DkvmError(f"the VM was not ready for {what} within {timeout}s", 126)
            time.sleep(0.1)


class ExecRelay:
    stdin = 0                                   # what the guest's stdin is read from

    def __init__(self, sock, process, winsize=(), member="", port=0):
        """`member`: the pod member's container id the exec is into ("": the VM's
        workload); `port`: a connection to the guest's localhost:port, not a process."""
        self.sock = sock
        self.start = ExecStart(process=process, winsize=list(winsize), member=member,
                               port=port)
        self.decoder = wire.Decoder()
        self.credit = wire.STREAM_WINDOW        # stdin bytes the guest will take now
        self.stdin_open = True
        self.status = None
        self.signals = None                     # a SignalInbox: SIGWINCH, with -t

    def run(self):
        """The guest process's exit status; 137 if the VM goes first."""
        try:
            self.send_start()
            while self.status is None:
                self.step()
            return self.status
        except (BrokenPipeError, ConnectionResetError):   # gone with our frames unread
            self.read_refusal()
            return vm_gone()
        finally:
            self.stop_watching_signals()

    def send_start(self):
        self.send(wire.EXEC_START, self.start)

    def watch_resizes(self):
        """A terminal's resizes (SIGWINCH) wake the loop at once."""
        from dkvm.container.signal_inbox import SignalInbox
        self.signals = SignalInbox([_signal.SIGWINCH])

    def stop_watching_signals(self):
        if self.signals is not None:
            self.signals.close()
            self.signals = None

    def on_signals(self, taken):
        """Signals the inbox took, as (number, sender): here only SIGWINCH."""
        if taken:
            self.send_size()

    def step(self, timeout=1.0):
        watch = [self.sock] + ([self.stdin] if self.stdin_open and self.credit > 0 else [])
        if self.signals is not None:
            watch.append(self.signals)
        ready, _, _ = select.select(watch, [], [], timeout)
        if self.signals is not None and self.signals in ready:
            self.on_signals(self.signals.take())
        if self.stdin in ready:
            data = self.read_input(min(self.credit, wire.MAX_DATA))
            self.send(wire.STDIN, data)
            self.credit -= len(data)
            self.stdin_open = bool(data)
        if self.sock in ready:
            data = self.sock.recv(1 << 16)
            if not data:
                self.status = vm_gone()
                return
            for frame in wire.feed_tolerant(self.decoder, data, warn):
                try:
                    self.on_frame(frame)
                except wire.ProtocolError as err:
                    warn(str(err))

    def read_refusal(self):
        """The supervisor may have refused us (on_frame raises its line) and closed the
        socket before reading our request: what it sent is still ours to read."""
        self.sock.setblocking(False)
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            for frame in wire.feed_tolerant(self.decoder, data, warn):
                self.on_frame(frame)

    def send_size(self):
        size = terminal.get_size(0)
        if size:
            self.send(wire.RESIZE, {"rows": size[0], "cols": size[1]})

    def send(self, ftype, payload=b""):
        self.sock.sendall(wire.encode(ftype, payload))

    def read_input(self, limit):
        """Up to `limit` bytes for the guest's stdin; b"": its end."""
        try:
            return os.read(0, limit)
        except OSError:
            return b""

    def write_output(self, ftype, data):
        write_all(1 if ftype == wire.STDOUT else 2, data)

    def on_frame(self, frame):
        if frame.type in (wire.STDOUT, wire.STDERR):
            self.write_output(frame.type, frame.payload)
            if frame.payload:
                self.send(wire.WINDOW, {"bytes": len(frame.payload)})
        elif frame.type == wire.WINDOW:
            self.credit += frame.record().bytes
        elif frame.type == wire.EXEC_EXIT:
            self.status = frame.record().status
        elif frame.type == wire.ERROR:          # the supervisor refused this exec
            raise DkvmError(log.printable(frame.record().message), EXEC_FAILED)


def vm_gone():
    log.warn("the VM stopped before the exec ended")
    return VM_GONE_STATUS


def write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BrokenPipeError:
            return


def warn(message):
    log.warn(f"exec channel: {message}")


def make_raw(fd):
    """The guest's terminal does the line discipline; ours must pass bytes as they are.
    The terminal's settings before, to restore (restore_terminal), or None."""
    if not os.isatty(fd):
        return None
    import termios
    import tty
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    return saved


def restore_terminal(fd, saved):
    if saved is not None:
        import termios
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
