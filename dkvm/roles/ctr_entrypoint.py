"""dkvm-ctr-entrypoint: PID 1 of the container, the VM's host side.

It writes the plan where the guest will read it, starts virtiofsd on the container's
root, boots QEMU, forwards signals to the workload over the control channel, and
leaves with the exit status the guest reports.
"""
import os
import select
import signal
import socket
import subprocess
import sys
import time

from dkvm import paths, wire
from dkvm.errors import DkvmError
from dkvm.plan import PLAN_ENV, Plan
from dkvm.qemu import qemu_argv, qemu_env, virtiofsd_argv

START_TIMEOUT = 30          # virtiofsd socket, QEMU connecting to the control socket
EXIT_GRACE = 10             # QEMU powering off after the guest reported its exit
FORWARDED_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH]


def main(argv):
    plan = Plan.from_json(os.environ[PLAN_ENV])
    with open(paths.PLAN_FILE, "w") as f:
        f.write(plan.to_json())
    virtiofsd = start_virtiofsd()
    listener = listen(paths.CONTROL_SOCKET)
    qemu = start_qemu(plan)
    children = {"QEMU": (qemu, paths.QEMU_LOG), "virtiofsd": (virtiofsd, paths.VIRTIOFSD_LOG)}
    try:
        conn = accept_qemu(listener, children)
        status = supervise(conn, qemu, children)
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
    """QEMU gets the container's stdout/stderr as two extra fds for the output ports;
    its own fd 2 goes to a log so that its warnings never mix with the workload's."""
    out_fd, err_fd = os.dup(1), os.dup(2)
    vcpus = plan.cpus or len(os.sched_getaffinity(0))
    argv = qemu_argv(plan, vcpus, out_fd, err_fd)
    log = open(paths.QEMU_LOG, "wb")
    stdio = {} if plan.terminal else {"stdin": subprocess.DEVNULL, "stdout": log}
    proc = subprocess.Popen(argv, env=dict(os.environ, **qemu_env()), stderr=log,
                            pass_fds=(out_fd, err_fd), **stdio)
    os.close(out_fd)
    os.close(err_fd)
    return proc


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


def supervise(conn, qemu, children):
    """Relay signals to the guest and wait for the workload's exit status."""
    pending = []
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    decoder = wire.Decoder()
    status, exit_deadline = None, None
    while exit_deadline is None or time.monotonic() < exit_deadline:
        while pending:
            send(conn, wire.encode(wire.SIGNAL, {"signal": pending.pop(0)}))
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
            if frame.type == wire.EXIT:
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
