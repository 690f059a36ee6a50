"""dkvm-ctr-entrypoint: PID 1 of the container, the VM's host side.

It hands the container's network interfaces to the VM (and, from then on, follows
`docker network connect`/`disconnect` with hot-plugged NICs), writes the plan where the
guest will read it, starts virtiofsd on the container's root and boots QEMU. Then it
serves the control channel: signals and terminal resizes for the workload, stdin,
`docker exec` relays (one channel each), DNS queries for Docker's embedded server;
and it leaves with the exit status the guest reports.
"""
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from dkvm import paths, wire
from dkvm.dns import EmbeddedDnsRelay
from dkvm.errors import DkvmError
from dkvm.framed import FramedSocket
from dkvm.net_container import ipv6_sysctls, take_over_interfaces
from dkvm.net_hotplug import NetworkFollower
from dkvm.net_steps import interface_steps
from dkvm.plan import PLAN_ENV, Plan
from dkvm.qemu import qemu_argv, qemu_env, virtiofsd_argv
from dkvm.terminal import get_size

START_TIMEOUT = 30          # virtiofsd socket, QEMU connecting to the control socket
BOOT_TIMEOUT = 180          # QEMU started -> the guest says hello (TCG on a busy host: ~10 s)
EXIT_GRACE = 10             # QEMU powering off after the guest reported its exit
FORWARDED_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2]


def main(argv):
    plan = Plan.from_json(os.environ[PLAN_ENV])
    if plan.terminal:
        plan.winsize = get_size(0)
    follower = NetworkFollower()        # listening first: nothing Docker does is missed
    plan.interfaces = take_over_interfaces()
    plan.network_setup = interface_steps(plan.interfaces)
    plan.sysctl = {**ipv6_sysctls(), **plan.sysctl}
    with open(paths.PLAN_FILE, "w") as f:
        f.write(plan.to_json())
    virtiofsd = start_virtiofsd()
    control_listener = listen(paths.CONTROL_SOCKET)
    exec_listener = listen(paths.EXEC_SOCKET, backlog=64)
    stdin_listener = None if plan.terminal else listen(paths.STDIN_SOCKET)
    qemu = start_qemu(plan)
    follower.start(plan.interfaces, paths.QMP_SOCKET)
    children = {"QEMU": (qemu, paths.QEMU_LOG), "virtiofsd": (virtiofsd, paths.VIRTIOFSD_LOG)}
    try:
        conn = accept_qemu(control_listener, children)
        stdin_conn = accept_qemu(stdin_listener, children) if stdin_listener else None
        status = supervise(conn, qemu, children, plan.terminal, stdin_conn, exec_listener,
                           follower.inbox)
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


def listen(path, backlog=1):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(backlog)
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


def supervise(control, qemu, children, terminal, stdin_conn, exec_listener, network_changes):
    """The container side of the control channel: relay signals, terminal resizes and
    network changes to the guest, multiplex `docker exec` relays onto channels, start
    stdin when the guest says hello, and wait for the workload's exit status."""
    pending = []
    for sig in FORWARDED_SIGNALS + ([signal.SIGWINCH] if terminal else []):
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    guest = FramedSocket(control)
    dns = EmbeddedDnsRelay()
    relays, last_channel = {}, 0
    held = []               # frames for the guest before it is ready for them
    status, exit_deadline = None, None
    boot_deadline = time.monotonic() + BOOT_TIMEOUT

    def to_guest(data):
        if held is None:
            guest.queue(data)
        else:
            held.append(data)

    while exit_deadline is None or time.monotonic() < exit_deadline:
        while pending:
            to_guest(signal_frame(pending.pop(0)))
        peers = [guest, *relays.values()]
        try:
            ready_r, ready_w, _ = select.select(
                [guest.sock, exec_listener, network_changes,
                 *(r.sock for r in relays.values()), *dns.sockets()],
                [p.sock for p in peers if p.out], [], 0.5)
        except InterruptedError:
            continue
        for peer in peers:
            if peer.sock in ready_w:
                peer.flush()
        if network_changes in ready_r:
            to_guest(network_changes.recv(wire.MAX_PAYLOAD))
        if exec_listener in ready_r:
            last_channel = free_channel(relays, last_channel)
            relays[last_channel] = FramedSocket(exec_listener.accept()[0])
        for sock in ready_r:
            if sock in dns.pending:
                answer = dns.answer(sock)
                if answer:
                    guest.queue(wire.encode(wire.DNS, answer))
        for channel, relay in list(relays.items()):
            if relay.sock in ready_r:
                for frame in relay.receive(warn):
                    to_guest(wire.encode(frame.type, frame.payload, channel))
            if relay.closed:
                relay.close()
                del relays[channel]
                to_guest(wire.encode(wire.CLOSE, channel=channel))
        if guest.sock in ready_r:
            for frame in guest.receive(warn):
                if frame.channel:
                    if frame.channel in relays:
                        relays[frame.channel].queue(wire.encode(frame.type, frame.payload))
                elif frame.type == wire.HELLO and held is not None:
                    for data in held:
                        guest.queue(data)
                    held = None
                    if stdin_conn is not None:
                        start_stdin_relay(stdin_conn)
                elif frame.type == wire.EXIT:
                    status = frame.json()["status"]
                    exit_deadline = time.monotonic() + EXIT_GRACE
                    guest.queue(wire.encode(wire.EXIT_ACK))
                elif frame.type == wire.DNS:
                    dns.ask(frame.payload)
                elif frame.type == wire.ERROR:
                    print(f"dkvm: {frame.json()['message']}", file=sys.stderr, flush=True)
            if guest.closed:
                break
        if not ready_r and not ready_w:
            if qemu.poll() is not None:
                break
            check_children(children)
            if held is not None and time.monotonic() > boot_deadline:
                raise DkvmError(f"the VM did not start the workload within {BOOT_TIMEOUT}s"
                                f"{console_tail()}")
    if status is None:
        try:
            qemu.wait(timeout=EXIT_GRACE)
        except subprocess.TimeoutExpired:
            pass
        raise DkvmError("the VM stopped without reporting the workload's exit status"
                        f"{describe_exit(qemu, 'QEMU', paths.QEMU_LOG)}{console_tail()}; "
                        "run with DKVM_KERNEL_DEBUG=1 to see the boot log")
    return status


def signal_frame(signum):
    if signum == signal.SIGWINCH:
        rows, cols = get_size(0) or (0, 0)
        return wire.encode(wire.RESIZE, {"rows": rows, "cols": cols})
    return wire.encode(wire.SIGNAL, {"signal": signum})


def free_channel(relays, last=0):
    """The first free channel after `last`: one just given up comes back last, as
    frames of its old exec may still be on their way from the guest."""
    return next(c for c in itertools.chain(range(last + 1, 1 << 16), range(1, last + 1))
                if c not in relays)


def warn(message):
    print(f"dkvm: control channel: {message}", file=sys.stderr, flush=True)


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


def console_tail():
    text = tail(paths.CONSOLE_LOG)
    return f" (guest console: {text})" if text else ""


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
