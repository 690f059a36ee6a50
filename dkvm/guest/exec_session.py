"""`docker exec` in the guest: each exec is a session on its own control channel.

The process joins the workload's PID and mount namespaces (it sees what the
workload sees, as with runc). Its streams travel as frames: output only while the
relay has granted window, stdin written without blocking PID 1, and the exit status
sent only after every byte of output the process wrote.
"""
import errno
import fcntl
import os
import _signal

from dkvm import terminal, wire
from dkvm.guest import syscalls, world
from dkvm.guest.process import (become_and_exec, bounding_set, last_capability,
                                limit_bounding_set, report_exec_failure)

EXEC_START_FAILED = 126     # what Docker answers for any exec that cannot start
TIOCSPTLCK, TIOCGPTPEER = 0x40045431, 0x5441


def container_ptmx(pid):
    """The ptmx of the devpts of the container `pid` is in (its /dev/pts, through its
    root): a terminal there is one an exec under runc gets, `tty` names it there."""
    return f"/proc/{pid}/root/dev/pts/ptmx"


def open_pty(ptmx):
    """(master, slave) of a new terminal of the devpts whose ptmx is `ptmx`."""
    master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, b"\0\0\0\0")          # unlock
        return master, fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        os.close(master)
        raise


def spawn_in_workload(process, workload_pid, stdio, fork=os.fork):
    """Fork the exec'd process into the workload's cgroup and its cgroup and mount
    namespaces (the PID namespace is already PID 1's for its children; `fork` forks
    into a pod member's: guest.members) as a session leader, within the workload's
    bounding set, as runc's exec is within its container's."""
    namespaces = [(os.open(f"/proc/{workload_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC),
                   flag) for name, flag in (("cgroup", syscalls.CLONE_NEWCGROUP),
                                            ("mnt", syscalls.CLONE_NEWNS))]
    user_ns = None          # the workload's, if it has one: joined last, as it was made
    if os.stat(f"/proc/{workload_pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino:
        user_ns = os.open(f"/proc/{workload_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    pid = fork()
    if pid:
        for fd in [fd for fd, _ in namespaces] + ([user_ns] if user_ns is not None else []):
            os.close(fd)
        return pid
    try:
        world.join_workload_cgroup(workload_pid)
        limit_bounding_set(bounding_set(workload_pid), last_capability())
        for fd, flag in namespaces:
            syscalls.setns(fd, flag)
        os.setsid()
        if process.terminal:
            fcntl.ioctl(stdio[0], syscalls.TIOCSCTTY, 0)
    except BaseException as err:
        os.write(stdio[2], f"dkvm: cannot enter the container: {err}\n".encode())
        os._exit(EXEC_START_FAILED)
    become_and_exec(stdio, process, report=report_exec_failure, failure_status=EXEC_START_FAILED,
                    enter_user_namespace=user_ns is not None and (
                        lambda: syscalls.setns(user_ns, syscalls.CLONE_NEWUSER)))


class ExecSession:
    member = None       # a pod member's session: its MemberStart (guest.members)
    on_end = None       # what to do once the process is gone, before its status is sent

    def __init__(self, channel, start, workload_pid, send, spawn=spawn_in_workload,
                 ptmx=None):
        """`start`: the schema.ExecStart; `send`: writes frames to the container side;
        `spawn`: how the process is started (a test starts it without namespaces);
        `ptmx`: where its terminal is made (a pod member's own devpts), if not in the
        container of `workload_pid`."""
        self.open_channel(channel, send)
        if start.process.terminal:
            self.master, slave = open_pty(ptmx or container_ptmx(workload_pid))
            if len(start.winsize) == 2:
                terminal.set_size(self.master, *start.winsize)
            child_stdio = (slave, slave, slave)
            self.stdin_fd = self.master
            self.outputs = {self.master: wire.STDOUT}
        else:
            in_r, self.stdin_fd = os.pipe2(os.O_CLOEXEC)
            fcntl.fcntl(self.stdin_fd, fcntl.F_SETPIPE_SZ, wire.STREAM_WINDOW)  # a window at once
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            child_stdio = (in_r, out_w, err_w)
            self.outputs = {out_r: wire.STDOUT, err_r: wire.STDERR}
        for fd in {self.stdin_fd, *self.outputs}:
            os.set_blocking(fd, False)
        self.pid = spawn(start.process, workload_pid, child_stdio)
        for fd in set(child_stdio):
            os.close(fd)

    def open_channel(self, channel, send):
        self.channel, self.send = channel, send
        self.credit = wire.STREAM_WINDOW
        self.stdin_buf, self.stdin_eof = bytearray(), False
        self.status = None
        self.ended = False
        self.master = None
        self.hung_up = False        # the terminal's other side closed, the process lives on
        self.abandoned = False      # the relay is gone (CLOSE)

    # --- what the main loop polls
    def readable_fds(self):
        return list(self.outputs) if self.credit > 0 and not self.hung_up else []

    def writable_fds(self):
        return [self.stdin_fd] if self.stdin_buf and self.stdin_fd is not None else []

    # --- events
    def on_frame(self, frame):
        if frame.type == wire.STDIN:
            if frame.payload:
                self.stdin_buf += frame.payload
            else:
                self.stdin_eof = True
            self.write_stdin()
        elif frame.type == wire.WINDOW:
            self.credit += frame.record().bytes
            self.drain()
        elif frame.type == wire.RESIZE and self.master is not None:
            size = frame.record()
            terminal.set_size(self.master, size.rows, size.cols)
        elif frame.type == wire.CLOSE:
            self.kill()
            self.abandon()

    def abandon(self):
        """The relay is gone: nobody will take output or grant window again. Drop the
        streams now (else a process that had spent the window would keep the session,
        and its fds, forever); the session ends with the process, sending nothing more."""
        self.abandoned = True
        self.stdin_buf.clear()
        for fd in list(self.outputs):
            self.close_output(fd)
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None
        self.drain()

    def write_stdin(self):
        if self.stdin_buf and self.stdin_fd is not None:
            try:
                n = os.write(self.stdin_fd, self.stdin_buf)
            except BlockingIOError:
                n = 0
            except OSError:          # the process closed its stdin: drop what is left
                n = len(self.stdin_buf)
            del self.stdin_buf[:n]
            if n:
                self.send(wire.encode(wire.WINDOW, {"bytes": n}, self.channel))
        if self.stdin_eof and not self.stdin_buf and self.stdin_fd is not None:
            self.end_stdin()
            self.stdin_fd = None

    def end_stdin(self):
        if self.master is None:
            os.close(self.stdin_fd)
        else:
            os.write(self.master, b"\x04")   # EOF on a terminal is ^D

    def read_output(self, fd):
        """Send what `fd` has, within the window; False once it has nothing more (or the
        window is spent: a read of 0 bytes is not an end of file)."""
        if self.credit <= 0:
            return False
        try:
            data = os.read(fd, min(self.credit, wire.MAX_DATA))
        except BlockingIOError:
            if self.status is None:
                return False
            data = b""                       # the process is gone: nothing more will come
        except OSError as err:
            if err.errno != errno.EIO:       # EIO: the terminal's other side closed
                raise
            if self.status is None:
                # Closing the master would hang up a process that closed its terminal
                # but has not exited yet (SIGHUP: status 129). Keep it until the exit.
                self.hung_up = True
                return False
            data = b""
        if not data:
            self.close_output(fd)
            return False
        self.credit -= len(data)
        self.send(wire.encode(self.outputs[fd], data, self.channel))
        return True

    def close_output(self, fd):
        kind = self.outputs.pop(fd)
        if fd == self.master:
            self.stdin_fd = None
        if fd != self.stdin_fd:
            os.close(fd)
        return kind

    def on_exit(self, status):
        self.status = status
        self.drain()

    def drain(self):
        """After the process ended: send what its outputs still hold, then the status."""
        if self.status is None or self.ended:
            return
        for fd in list(self.outputs):
            while self.credit > 0 and fd in self.outputs and self.read_output(fd):
                pass
        if not self.outputs:
            if self.stdin_fd is not None and self.master is None:
                os.close(self.stdin_fd)
            self.stdin_fd = None
            self.ended = True
            if self.on_end is not None:
                self.on_end()
            # a member's status goes even to a relay that is gone: it says its export
            # is free to unplug (container.member_exports)
            if not self.abandoned or self.member is not None:
                self.send(wire.encode(wire.EXEC_EXIT, {"status": self.status}, self.channel))

    def kill(self):
        if self.status is None:
            try:
                os.killpg(self.pid, _signal.SIGKILL)
            except OSError:
                pass

