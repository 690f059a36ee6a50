"""A pod member's container side (host.pods): its export handed to the pod's sandbox
with the member's start, then its process relayed as an exec's is (exec_relay):
stdio within the window, terminal resizes, the exit status; and the signals runc
sends this relay (containerd's `runc kill`: TERM to stop with grace, ...), which are
the member's.

The member has no VM: its process runs in the pod's (the sandbox's), in the member's
own root and namespaces. Its export goes as two descriptors: its directory
(paths.SHARE_DIR: the image's root with the kubelet's mounts, and the payload) and
this container's mount namespace, which keeps those mounts alive while the sandbox
serves them, even after this relay is gone. The sandbox's container side runs the
export's virtiofsd (member_exports): a virtiofsd that died under the guest would
wedge every virtiofs mount of the pod's VM. SIGKILL kills this relay (runc), which
closes its channel: the guest kills the member.

The relay is an object so that a test drives it with a socketpair. It imports what
it needs as the exec relay does (`_socket` and `_signal`: the modules around them
import enum)."""
import os
import _signal
import _socket
import struct

from dkvm import paths, wire
from dkvm.container.exec_relay import ExecRelay
from dkvm.container.own_limits import own_rlimits
from dkvm.errors import DkvmError
from dkvm.schema import MemberStart


class MemberRelay(ExecRelay):
    def __init__(self, sock, plan, export, signals, winsize=()):
        """`plan`: the member's (handoff.own_plan, completed: complete_member_plan);
        `export`: its descriptors (export_fds), which go with MEMBER_START and are
        closed here then; `signals`: a SignalInbox holding every signal since this
        process started."""
        super().__init__(sock, plan.process, winsize)
        self.member_start = MemberStart(container_id=plan.container_id, plan=plan,
                                        winsize=list(winsize))
        self.export = export
        self.signals = signals
        self.terminal = plan.process.terminal

    def send_start(self):
        """MEMBER_START with the export's descriptors, in one sendmsg: they arrive
        with the frame's first bytes."""
        data = wire.encode(wire.MEMBER_START, self.member_start)
        rights = struct.pack(f"{len(self.export)}i", *self.export)
        try:
            sent = self.sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        finally:
            for fd in self.export:
                os.close(fd)
            self.export = []
        self.sock.sendall(data[sent:])

    def on_signals(self, taken):
        """Each signal is the member's, but for the ones we cause: our own (SIGPIPE)
        and a child's SIGCHLD. With a terminal, SIGWINCH is its new size."""
        for signum, sender in taken:
            if sender == os.getpid() or (signum == _signal.SIGCHLD and sender != 0):
                continue
            if signum == _signal.SIGWINCH and self.terminal:
                self.send_size()
            else:
                self.send(wire.SIGNAL, {"signal": signum})


def export_fds(share_dir=paths.SHARE_DIR, volumes=0, volumes_dir=paths.POD_VOLUMES_DIR):
    """The member's export as the sandbox's virtiofsd will serve it: its directory
    (O_PATH: nothing is opened in it here), this container's mount namespace, and
    each of its `volumes` (host.rewrite.with_pod_volumes: our own binds of them)."""
    directory = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
    places = [(share_dir, directory, "export"), ("/proc/self/ns/mnt", os.O_RDONLY,
                                                 "mount namespace")] + [
        (f"{volumes_dir}/{n}", directory, "volume") for n in range(volumes)]
    fds = []
    try:
        for path, flags, what in places:
            try:
                fds.append(os.open(path, flags | os.O_CLOEXEC))
            except OSError as err:
                raise DkvmError(f"this container's {what} {path} cannot be opened: "
                                f"{err.strerror}") from None
        return fds
    except DkvmError:
        for fd in fds:
            os.close(fd)
        raise


def complete_member_plan(plan, winsize):
    """What the member's plan needs that only its container side knows (as the
    entrypoint completes a container's): the terminal's size and our resource limits
    (the engine's: what runc's process would have had)."""
    plan.winsize = list(winsize)
    plan.default_rlimits = own_rlimits(plan.engine_nofile)
    return plan
