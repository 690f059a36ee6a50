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

A Kubernetes pod's member (host.pods) has no VM: its process is a relay
(dkvm-pod-member) that forwards the catchable signals to the member's process in the
pod's VM, so the runtime waits until it blocks them too; SIGKILL and SIGSTOP go to
runc as they are (a killed relay's channel closes, and the guest kills the member).

A container that is not running, or not DKVM's, is runc's to answer. (Every `docker
stop` comes through here: beyond the signal's name, nothing is imported until a signal
needs it.)"""
import os

from dkvm.host.runc_cli import container_pid
from dkvm.kernel_names import SIGKILL, SIGSTOP, handles_signal, signal_number

KILL_GRACE = 0.8            # the guest killing the workload and powering off
STOP_WAIT = 1               # the entrypoint passing SIGSTOP on
BLOCK_WAIT = 2              # the entrypoint's interpreter starting, on a loaded host
EXIT_WAIT = 2               # the entrypoint ending once its workload is dead
ENTRYPOINT = b"dkvm-ctr-entrypoint"
POD_MEMBER = b"dkvm-pod-member"            # a pod member's relay


def deliver_in_guest(call, runc):
    """Before `runc kill` (`call`, a runc_cli.RuncCall): False when runc need not run
    at all."""
    signum = kill_signal(call)
    if not signum or not call.container_id:
        return True
    pid = container_pid(runc, call)
    if not pid:
        return True
    if signum not in (SIGKILL, SIGSTOP):
        wait_until_blocked(pid, signum)
        return True
    if runs(pid, POD_MEMBER):
        return True
    from dkvm import signal_request
    try:
        proc = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        # the process behind `proc` is held from here on: still the container's?
        if container_pid(runc, call) != pid:
            return True
        sock = connect_signal_socket(proc, pid, KILL_GRACE if signum == SIGKILL else STOP_WAIT)
    finally:
        os.close(proc)
    if not sock:
        return True
    try:
        sock.sendall(signal_request.encode(signum))
        while sock.recv(64):
            pass
    except OSError:             # the guest took too long
        return True
    finally:
        sock.close()
    return signum == SIGKILL and still_to_kill(call, runc, pid)


def still_to_kill(call, runc, pid):
    """After the guest's SIGKILL: runc's too, unless the container has stopped by then
    (its entrypoint ended with the workload): the signal was delivered, and runc would
    fail for want of a running container. With --all, runc's always (the container's
    other processes, an exec relay's)."""
    if any(arg in ("--all", "-a") for arg in call.command_args):
        return True
    wait_for_exit(pid)
    return container_pid(runc, call, statuses=("running", "paused", "created")) == pid


def wait_for_exit(pid, timeout=EXIT_WAIT):
    """Until `pid` (the entrypoint, done with its workload) has exited, bounded: its
    socket closes at its end, and it may still be giving a kept namespace its
    interfaces back, which runc's SIGKILL would cut short."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    return
        except (OSError, IndexError):
            return
        time.sleep(0.01)


def connect_signal_socket(proc, pid, timeout):
    """A connection to the entrypoint's signal socket in its private /run, or None.
    The container side can write there (QEMU has its uid): the socket is found with no
    link followed (openat2 from the process's root, RESOLVE_NO_SYMLINKS), must be a
    socket, is connected through its own descriptor (the inode found, not the path
    again), and must be the one the entrypoint (`pid`) itself listens on."""
    import socket
    import stat
    import struct
    from dkvm import paths
    from dkvm.boot.rooted import (RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS,
                                  openat2)
    try:
        root = os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
    except OSError:
        return None
    try:
        where = openat2(root, paths.SIGNAL_SOCKET.lstrip("/"), os.O_PATH, 0,
                        RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    except OSError:
        return None
    finally:
        os.close(root)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not stat.S_ISSOCK(os.fstat(where).st_mode):
            raise OSError("not a socket")
        sock.settimeout(timeout)
        sock.connect(f"/proc/self/fd/{where}")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[0] != pid:
            raise OSError("not the entrypoint's")
        return sock
    except OSError:
        sock.close()
        return None
    finally:
        os.close(where)


def kill_signal(call):
    """The number of the signal `kill [--all|-a] ID [SIGNAL]` sends (runc's default:
    TERM); None for one runc does not know, or with no container named."""
    if not call.container_id:
        return None
    return signal_number(call.signal or "TERM")


def runs(pid, program):
    """Whether process `pid`'s command line runs DKVM's `program` (a role's name)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(program) for arg in argv)


def wait_until_blocked(pid, signum, timeout=BLOCK_WAIT):
    """Until DKVM's entrypoint or a pod member's relay (pid) blocks `signum`; at once
    for any other process, and for one that runc has yet to exec (its command line is
    runc's) only as long as that lasts."""
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
        ours = any(arg.endswith((ENTRYPOINT, POD_MEMBER)) for arg in argv)
        if not ours and not os.path.basename(argv[0]).startswith(b"runc"):
            return
        if ours and handles_signal(status, signum):
            return
        time.sleep(0.002)
