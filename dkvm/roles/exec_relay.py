"""dkvm-exec: what `runc exec` starts in the container for `docker exec`. It relays
one exec into the guest over the container side's control multiplexer: the request,
stdin (within the window the guest grants), stdout and stderr apart, terminal
resizes, and leaves with the guest process's exit status."""
import json
import os
import select
import signal
import socket
import sys
import time

from dkvm import paths, terminal, wire
from dkvm.errors import DkvmError
from dkvm.rewrite import EXEC_ENV
CONNECT_TIMEOUT = 180       # a VM still booting: wait, then give up clearly
VM_GONE_STATUS = 137


def main(argv):
    request = json.loads(os.environ[EXEC_ENV])
    sock = connect(paths.EXEC_SOCKET, CONNECT_TIMEOUT)
    raw_tty = None
    if request.get("terminal"):
        request["winsize"] = terminal.get_size(0)
        raw_tty = make_raw(0)
    try:
        return relay(sock, request)
    finally:
        if raw_tty is not None:
            import termios
            termios.tcsetattr(0, termios.TCSADRAIN, raw_tty)


def connect(path, timeout):
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise DkvmError(f"the VM was not ready for exec within {timeout}s", 126)
            time.sleep(0.1)


def make_raw(fd):
    """The guest's terminal does the line discipline; ours must pass bytes as they are."""
    if not os.isatty(fd):
        return None
    import termios
    import tty
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    return saved


def relay(sock, request):
    try:
        return exchange(sock, request)
    except (BrokenPipeError, ConnectionResetError):   # gone with our frames unread
        return vm_gone()


def vm_gone():
    print("dkvm: the VM stopped before the exec ended", file=sys.stderr, flush=True)
    return VM_GONE_STATUS


def exchange(sock, request):
    resized = []
    if request.get("terminal"):
        signal.signal(signal.SIGWINCH, lambda *a: resized.append(True))
    sock.sendall(wire.encode(wire.EXEC_START, request))
    decoder = wire.Decoder()
    credit, stdin_open = wire.STREAM_WINDOW, True
    while True:
        if resized:
            resized.clear()
            size = terminal.get_size(0)
            if size:
                sock.sendall(wire.encode(wire.RESIZE, {"rows": size[0], "cols": size[1]}))
        watch = [sock] + ([0] if stdin_open and credit > 0 else [])
        try:
            ready, _, _ = select.select(watch, [], [], 1.0)
        except InterruptedError:
            continue
        if 0 in ready:
            data = read_stdin(min(credit, wire.MAX_DATA))
            sock.sendall(wire.encode(wire.STDIN, data))
            credit -= len(data)
            stdin_open = bool(data)
        if sock in ready:
            data = sock.recv(1 << 16)
            if not data:
                return vm_gone()
            for frame in wire.feed_tolerant(decoder, data, warn):
                if frame.type in (wire.STDOUT, wire.STDERR):
                    write_all(1 if frame.type == wire.STDOUT else 2, frame.payload)
                    sock.sendall(wire.encode(wire.WINDOW, {"bytes": len(frame.payload)}))
                elif frame.type == wire.WINDOW:
                    credit += frame.json()["bytes"]
                elif frame.type == wire.EXEC_EXIT:
                    return frame.json()["status"]


def read_stdin(limit):
    try:
        return os.read(0, limit)
    except OSError:
        return b""


def write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BrokenPipeError:
            return


def warn(message):
    print(f"dkvm: exec channel: {message}", file=sys.stderr, flush=True)
