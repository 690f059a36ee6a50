"""The workload in the guest: PID 1 of its own PID and mount namespaces, as runc
starts it, with the container's stdio ports or the console as its terminal."""
import fcntl
import os

from dkvm.guest import syscalls
from dkvm.guest.process import become_and_exec

CONSOLE = "/dev/hvc0"


def open_console(winsize):
    """The guest console (QEMU's stdio, with -t), at the client's terminal size."""
    from dkvm import terminal
    console = os.open(CONSOLE, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    if len(winsize) == 2:
        terminal.set_size(console, *winsize)
    return console


def spawn(process, stdio):
    """Start the workload as PID 1 of its own PID namespace, as runc does: it sees
    itself as PID 1, gets PID 1's signal semantics, and reaps its own orphans. With a
    terminal, the console is its controlling terminal and stdio. (After this, init
    may not start threads: the kernel refuses them once it has unshared its PID
    namespace.)"""
    syscalls.unshare(syscalls.CLONE_NEWPID)
    pid = os.fork()
    if pid:
        return pid
    try:
        syscalls.unshare(syscalls.CLONE_NEWNS)
        syscalls.make_mounts_private()
        syscalls.mount("proc", "/proc", "proc",
                       *syscalls.mount_options(["nosuid", "nodev", "noexec"]))
        os.setsid()
        if process.terminal:
            tty = os.open(CONSOLE, os.O_RDWR)
            fcntl.ioctl(tty, syscalls.TIOCSCTTY, 0)
            stdio = (tty, tty, tty)
    except BaseException as err:
        os.write(2, f"dkvm: cannot set up the workload: {err}\n".encode())
        os._exit(127)
    become_and_exec(stdio, process)
