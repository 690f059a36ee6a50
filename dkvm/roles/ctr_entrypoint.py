"""dkvm-ctr-entrypoint: PID 1 of the container, the VM's host side.

It writes the plan where the guest will read it, starts virtiofsd on the container's
root, boots QEMU, forwards signals to the workload over the control channel, and
leaves with the exit status the guest reports.
"""
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
import time

from dkvm import paths, wire
from dkvm.errors import DkvmError
from dkvm.plan import PLAN_ENV, Plan
from dkvm.qemu import qemu_argv, qemu_env, virtiofsd_argv

START_TIMEOUT = 30          # virtiofsd socket, QEMU connecting to the control socket
EXIT_GRACE = 10             # QEMU powering off after the guest reported its exit
FORWARDED_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2]


def main(argv):
    plan = Plan.from_json(os.environ[PLAN_ENV])
    if plan.terminal:
        plan.winsize = terminal_size()
    with open(paths.PLAN_FILE, "w") as f:
        f.write(plan.to_json())
    virtiofsd = start_virtiofsd()
    control_listener = listen(paths.CONTROL_SOCKET)
    stdin_listener = None if plan.terminal else listen(paths.STDIN_SOCKET)
    qemu = start_qemu(plan)
    children = {"QEMU": (qemu, paths.QEMU_LOG), "virtiofsd": (virtiofsd, paths.VIRTIOFSD_LOG)}
    try:
        conn = accept_qemu(control_listener, children)
        stdin_conn = accept_qemu(stdin_listener, children) if stdin_listener else None
        status = supervise(conn, qemu, children, plan.terminal, stdin_conn)
    finally:
        for proc in (qemu, virtiofsd):
            stop(proc)
    return status


def start_virtiofsd():
    log = open(paths.VIRTIOFSD_LOG, "wb")
    proc = subprocess.Popen(virtiofsd_argv(), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=log)
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(paths.VIRTIOFS_SOCKET):
        if proc.poll() is not None:
            raise DkvmError(f"virtiofsd failed to start: {tail(paths.VIRTIOFSD_LOG)}")
        if time.monotonic() > deadline:
            raise DkvmError("virtiofsd did not create its socket in time")
        time.sleep(0.01)
    return proc


def listen(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    return sock


def start_qemu(plan):
    """QEMU gets the container's stdio as extra fds for the stdio ports; its own fd 2
    goes to a log so that its warnings never mix with the workload's output."""
    out_fd, err_fd = dup_or_null(1), dup_or_null(2)
    vcpus = plan.cpus or len(os.sched_getaffinity(0))
    argv = qemu_argv(plan, vcpus, out_fd, err_fd)
    log = open(paths.QEMU_LOG, "wb")
    stdio = {} if plan.terminal else {"stdin": subprocess.DEVNULL, "stdout": log}
    proc = subprocess.Popen(argv, env=dict(os.environ, **qemu_env()), stderr=log,
                            pass_fds=(out_fd, err_fd), **stdio)
    os.close(out_fd)
    os.close(err_fd)
    return proc


def start_stdin_relay(conn):
    """Copy our stdin to QEMU's stdin port; at EOF, shut the socket for writing, which
    the guest sees as EOF once it has read everything before it. (A full close would
    be a hang-up, on which QEMU drops what the guest has not read yet.) A thread, so a
    guest that does not read blocks only this."""
    def relay():
        try:
            while True:
                data = os.read(0, 65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    threading.Thread(target=relay, name="stdin-relay", daemon=True).start()


def dup_or_null(fd):
    """A copy of one of our stdio fds, or /dev/null where the runtime gave none."""
    try:
        return os.dup(fd)
    except OSError:
        return os.open("/dev/null", os.O_RDWR)


def terminal_size():
    """[rows, cols] of the container's terminal (fd 0), or [] if it has none."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return []
    return [rows, cols]


def accept_qemu(listener, children):
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([listener], [], [], 0.2)
        if ready:
            conn, _ = listener.accept()
            listener.close()
            return conn
        check_children(children)
    raise DkvmError("QEMU did not connect to the control channel in time")


def supervise(conn, qemu, children, terminal, stdin_conn):
    """Relay signals and terminal resizes to the guest, start relaying stdin when the
    guest says hello, and wait for the workload's exit status."""
    pending = []
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    if terminal:
        signal.signal(signal.SIGWINCH, lambda signum, frame: pending.append(signum))
    decoder = wire.Decoder()
    status, exit_deadline = None, None
    while exit_deadline is None or time.monotonic() < exit_deadline:
        while pending:
            signum = pending.pop(0)
            if signum == signal.SIGWINCH:
                size = terminal_size()
                if size:
                    send(conn, wire.encode(wire.RESIZE, {"rows": size[0], "cols": size[1]}))
            else:
                send(conn, wire.encode(wire.SIGNAL, {"signal": signum}))
        try:
            ready, _, _ = select.select([conn], [], [], 0.5)
        except InterruptedError:
            continue
        if not ready:
            if qemu.poll() is not None:
                break
            check_children(children)
            continue
        data = conn.recv(65536)
        if not data:
            break
        for frame in wire.feed_tolerant(decoder, data, warn):
            if frame.type == wire.HELLO and stdin_conn is not None:
                start_stdin_relay(stdin_conn)
                stdin_conn = None
            elif frame.type == wire.EXIT:
                status = frame.json()["status"]
                exit_deadline = time.monotonic() + EXIT_GRACE
                send(conn, wire.encode(wire.EXIT_ACK))
            elif frame.type == wire.ERROR:
                print(f"dkvm: {frame.json()['message']}", file=sys.stderr, flush=True)
    if status is None:
        try:
            qemu.wait(timeout=EXIT_GRACE)
        except subprocess.TimeoutExpired:
            pass
        raise DkvmError("the VM stopped without reporting the workload's exit status"
                        f"{describe_exit(qemu, 'QEMU', paths.QEMU_LOG)}; "
                        "run with DKVM_KERNEL_DEBUG=1 to see the boot log")
    return status


def warn(message):
    print(f"dkvm: control channel: {message}", file=sys.stderr, flush=True)


def send(conn, data):
    try:
        conn.sendall(data)
    except OSError:
        pass


def check_children(children):
    for name, (proc, log) in children.items():
        if proc.poll() is not None:
            raise DkvmError(f"{name} exited unexpectedly{describe_exit(proc, name, log)}")


def describe_exit(proc, name, log):
    code = proc.poll()
    if code is None:
        return ""
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    text = tail(log)
    return f" ({name} {how}{': ' + text if text else ''})"


def tail(path, limit=400):
    try:
        with open(path, "rb") as f:
            data = f.read().decode(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(data.splitlines())[-limit:]


def stop(proc, timeout=5):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
