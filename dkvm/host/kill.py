"""`runc kill` with the two signals no process can catch. Sent to the container as
they are, SIGKILL would end the VM like a power cut (the workload's peers never see
its connections close) and SIGSTOP would freeze the container side, not the
workload. So the runtime first asks the container's entrypoint to deliver them to
the workload in the guest (signal_request): SIGKILL then still goes to runc, once
the workload is dead or after KILL_GRACE whatever the guest does; SIGSTOP does not
(the workload is stopped, as it would be under runc).

Any other signal goes to the entrypoint, which passes it to the guest: a PID 1
ignores a signal it neither catches nor blocks, and the entrypoint blocks them all
only once its interpreter runs (its first tens of milliseconds after `start`). A
signal sent then would be lost, so the runtime waits (bounded) until it is blocked.

A container that is not running, or not DKVM's, is runc's to answer. (Every `docker
stop` comes through here: beyond the signal's name, nothing is imported until a signal
needs it.)"""
import os

from dkvm.host.runc_cli import container_pid
from dkvm.kernel_names import SIGKILL, SIGSTOP, handles_signal, signal_number

KILL_GRACE = 0.8            # the guest killing the workload and powering off
STOP_WAIT = 1               # the entrypoint passing SIGSTOP on
BLOCK_WAIT = 2              # the entrypoint's interpreter starting, on a loaded host
ENTRYPOINT = b"dkvm-ctr-entrypoint"


def deliver_in_guest(args, index, runc):
    """Before `runc kill`: False when runc need not run at all."""
    signum, container = kill_target(args[index + 1:])
    if not signum or not container:
        return True
    pid = container_pid(runc, args[:index], container)
    if not pid:
        return True
    if signum not in (SIGKILL, SIGSTOP):
        wait_until_blocked(pid, signum)
        return True
    import socket
    from dkvm import paths, signal_request
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(KILL_GRACE if signum == SIGKILL else STOP_WAIT)
        sock.connect(f"/proc/{pid}/root{paths.SIGNAL_SOCKET}")
        sock.sendall(signal_request.encode(signum))
        while sock.recv(64):
            pass
    except OSError:             # no such socket, or the guest took too long
        return True
    finally:
        sock.close()
    return signum == SIGKILL


def kill_target(command_args):
    """(signal number, container id) from `kill [--all|-a] ID [SIGNAL]`."""
    positional = [arg for arg in command_args if not arg.startswith("-")]
    if not positional:
        return None, ""
    return signal_number(positional[1] if len(positional) > 1 else "TERM"), positional[0]


def wait_until_blocked(pid, signum, timeout=BLOCK_WAIT):
    """Until DKVM's entrypoint (pid) blocks `signum`; at once for any other process,
    and for one that runc has yet to exec (its command line is runc's) only as long
    as that lasts."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
        except OSError:
            return
        ours = any(arg.endswith(ENTRYPOINT) for arg in argv)
        if not ours and not os.path.basename(argv[0]).startswith(b"runc"):
            return
        if ours and handles_signal(status, signum):
            return
        time.sleep(0.002)
