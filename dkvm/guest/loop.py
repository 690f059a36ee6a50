"""The guest's side of the control channel: one loop, one handler per frame type.

It reaps (init adopts every orphan), delivers signals and terminal resizes to the
workload (a signal sent while the VM booted waits for the workload's handler:
EarlySignals), runs `docker exec` sessions, a pod's members and its port-forwards (one
per channel), answers DNS through the container side, applies network changes when
their NICs appear, and ends when the workload does, with its exit status.

The loop is an object so that a test drives it with a socketpair: `step()` is one
turn. It polls (a wake-up fd for SIGCHLD, timeouts for what it waits on) because
init may not start threads once the workload's PID namespace exists.
"""
import os
import select
import _signal
import time

from dkvm import log, terminal, wire
from dkvm.errors import DkvmError
from dkvm.kernel_names import handles_signal
from dkvm.guest import members
from dkvm.guest.exec_session import EXEC_START_FAILED, ExecSession, spawn_in_workload
from dkvm.guest.network import PendingChanges
from dkvm.guest.port_forward import ForwardSession
from dkvm.schema import MOST_EXECS, ExecStart

IDLE = 1.0
ACK_WAIT = 5
POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
CONTROL_BATCH = 512 << 10   # read from the control port in one turn of the loop, at most
START_GRACE = 0.5           # a new workload's time to set up its signal handlers
DROP_CACHES = "/proc/sys/vm/drop_caches"    # "2": unused dentries and inodes
MEMBER_WAIT = 30            # an exec into a pod member whose start is still on its way


def reap():
    """Reap every exited child: {pid: exit status, 128+N for signal N}."""
    statuses = {}
    while True:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return statuses
        if pid == 0:
            return statuses
        code = os.waitstatus_to_exitcode(wstatus)
        statuses[pid] = 128 - code if code < 0 else code


def receive_plan(control, decoder):
    """Ask the container side for the plan (INIT) and wait for it (PLAN). The container
    side holds everything else back until HELLO. The wait is the container side's to
    bound: each of its steps before the plan is (under load, taking the interfaces can
    take a minute), then DKVM_BOOT_TIMEOUT, and QEMU ends with it. A bound of the
    guest's own would undercut them (before: 30 s, less the template's time waiting
    before its save, and a loaded host's boot failed with "no plan")."""
    write_all(control, wire.encode(wire.INIT))
    while True:
        data = os.read(control, 65536)
        if not data:
            raise DkvmError("the container side closed the control channel")
        for frame in wire.feed_tolerant(decoder, data, log.warn):
            if frame.type == wire.PLAN:
                return frame.record()


def write_all(fd, data):
    """A virtio-serial port takes at most 32 KiB a write."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class GuestLoop:
    def __init__(self, control, workload_pid, console=None, forwarder=None, reap=reap,
                 spawn_exec=spawn_in_workload, decoder=None, default_rlimits=(),
                 pod_members=members):
        """`control`: the control port's fd; `console`: the terminal's fd (with -t);
        `forwarder`: the guest's DNS forwarder, if the workload uses Docker's DNS;
        `reap` and `spawn_exec`: how children are reaped and execs started, and
        `pod_members` how a pod's members are (guest.members; a test passes its own);
        `default_rlimits`: every exec's, before its own."""
        self.control = control
        self.workload_pid = workload_pid
        self.console = console
        self.forwarder = forwarder
        self.reap = reap
        self.spawn_exec = spawn_exec
        self.decoder = decoder or wire.Decoder()
        self.default_rlimits = list(default_rlimits)
        self.pod_members = pod_members
        self.sessions = {}                  # channel -> ExecSession
        self.members = {}                   # a pod member's container id -> its ExecSession
        self.execs_waiting = {}             # member -> [(deadline, EXEC_START)]: not started yet
        self.network_changes = PendingChanges()
        self.status = None                  # the workload's, once it is reaped
        self.control_ready = select.poll()
        self.control_ready.register(control, POLL_IN)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.previous_wakeup = _signal.set_wakeup_fd(self.wake_w)
        self.previous_sigchld = _signal.signal(_signal.SIGCHLD, lambda *a: None)
        self.early_signals = EarlySignals(workload_pid)
        self.last_heartbeat = time.monotonic()
        self.handlers = {wire.SIGNAL: self.on_signal, wire.RESIZE: self.on_resize,
                         wire.DNS: self.on_dns, wire.NET: self.on_net,
                         wire.RELEASE: self.on_release}

    def send(self, data):
        write_all(self.control, data)

    def run(self):
        """Serve until the workload exits; its status."""
        while self.status is None:
            self.step()
        return self.status

    def step(self, timeout=IDLE):
        """One turn: reap, wait (poll: no limit on descriptor numbers) for what can be
        read or written, handle it."""
        self.reap_children()
        if self.status is not None:
            return
        readers = {fd: s for s in self.sessions.values() for fd in s.readable_fds()}
        writers = {fd: s for s in self.sessions.values() for fd in s.writable_fds()}
        dns_socks = self.forwarder.sockets() if self.forwarder else []
        if self.forwarder:
            timeout = self.forwarder.timeout(timeout)
        masks = {}
        for fd in (self.control, self.wake_r, *(s.fileno() for s in dns_socks), *readers):
            masks[fd] = POLL_IN
        for fd in writers:
            masks[fd] = masks.get(fd, 0) | select.POLLOUT
        poller = select.poll()
        for fd, mask in masks.items():
            poller.register(fd, mask)
        timeout = self.early_signals.timeout(self.network_changes.timeout(timeout))
        if self.execs_waiting:
            timeout = min(timeout, IDLE)
        events = poller.poll(timeout * 1000)
        ready_r = [fd for fd, mask in events if mask & POLL_IN]
        # a pipe whose reader is gone polls as POLLERR only: writing says so (EPIPE)
        ready_w = [fd for fd, mask in events if mask & (select.POLLOUT | select.POLLERR)
                   and fd in writers]
        if self.forwarder:
            ready_socks = [sock for sock in dns_socks if sock.fileno() in ready_r]
            for query in self.forwarder.serve(ready_socks):
                self.send(wire.encode(wire.DNS, query))
        if self.wake_r in ready_r:
            os.read(self.wake_r, 4096)
        for fd in ready_w:
            writers[fd].write_stdin()
        for fd in ready_r:
            if fd in readers and fd in readers[fd].outputs:
                readers[fd].read_output(fd)
        if self.control in ready_r:
            data = self.read_control()
            if not data:        # a port whose host side is gone reads as EOF forever
                raise DkvmError("the container side closed the control channel")
            for frame in wire.feed_tolerant(self.decoder, data, log.warn):
                self.on_frame(frame)
        for error in self.network_changes.apply_ready():
            self.report_error(f"network change in the guest failed: {error}")
        self.early_signals.deliver_ready()
        if self.execs_waiting:
            self.start_waiting_execs()
        if time.monotonic() - self.last_heartbeat >= wire.HEARTBEAT_INTERVAL:
            self.send(wire.encode(wire.HEARTBEAT))
            self.last_heartbeat = time.monotonic()

    def read_control(self):
        """What the control port holds, up to CONTROL_BATCH. Its driver hands over one
        page per read: a turn of this loop per read would hold a stream to what a few
        thousand turns a second carry under TCG."""
        data = os.read(self.control, 65536)
        chunks, size = [data], len(data)
        while data and size < CONTROL_BATCH and self.control_ready.poll(0):
            data = os.read(self.control, 65536)
            chunks.append(data)
            size += len(data)
        return b"".join(chunks)

    def reap_children(self):
        statuses = self.reap()
        if self.workload_pid in statuses:
            self.status = statuses[self.workload_pid]
        for session in list(self.sessions.values()):
            if session.pid in statuses:
                if session.member is not None:
                    self.pod_members.end_member(session.member.tag)
                session.on_exit(statuses[session.pid])
            if session.ended:
                del self.sessions[session.channel]
                if session.member is not None:
                    del self.members[session.member.container_id]

    def report_error(self, message):
        log.warn(message)
        self.send(wire.encode(wire.ERROR, {"message": message}))

    # --- frames from the container side
    def on_frame(self, frame):
        try:
            if frame.channel:
                self.on_exec_frame(frame)
            elif frame.type in self.handlers:
                self.handlers[frame.type](frame)
        except wire.ProtocolError as err:
            log.warn(str(err))

    def on_signal(self, frame):
        self.early_signals.deliver(frame.record().signal)

    def on_resize(self, frame):
        size = frame.record()
        if self.console is not None:
            terminal.set_size(self.console, size.rows, size.cols)

    def on_dns(self, frame):
        if self.forwarder:
            self.forwarder.give_answer(frame.payload)

    def on_net(self, frame):
        self.network_changes.add(frame.record())

    def on_release(self, frame):
        """virtiofsd holds a descriptor for each inode this kernel knows, and nears its
        limit: the cached inodes nothing uses go (their FORGETs free those), as a
        kernel under memory pressure lets them go; what is open stays."""
        try:
            fd = os.open(DROP_CACHES, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"2")
            finally:
                os.close(fd)
        except OSError as err:
            log.warn(f"cannot let go of cached inodes: {err.strerror}")

    def on_exec_frame(self, frame):
        if frame.type == wire.EXEC_START:
            self.start_exec(frame)
        elif frame.type == wire.MEMBER_START:
            self.start_member(frame)
        elif frame.channel in self.sessions:
            session = self.sessions[frame.channel]
            if frame.type == wire.SIGNAL and session.member is not None:
                if session.status is None:     # its pid not reaped: not another's yet
                    try:        # a member's runtime signals its PID 1, as runc would
                        os.kill(session.pid, frame.record().signal)
                    except ProcessLookupError:
                        pass
            else:
                session.on_frame(frame)

    def start_exec(self, frame):
        try:
            start = frame.record()
            if start.port:
                self.start_forward(frame.channel, start.port)
                return
            start.process.rlimits = self.default_rlimits + start.process.rlimits
            target, spawn = self.workload_pid, self.spawn_exec
            if start.member:
                if start.member not in self.members:
                    self.wait_for_member(start.member, frame)
                    return
                target = self.members[start.member].pid
                spawn = self.spawn_in_member(target)
            self.sessions[frame.channel] = ExecSession(frame.channel, start, target, self.send,
                                                       spawn=spawn)
        except Exception as err:
            self.refuse_session(frame.channel, "exec", err)

    def start_forward(self, channel, port):
        """A pod's port-forward (guest.port_forward): a session on its connection."""
        try:
            self.sessions[channel] = ForwardSession(channel, port, self.send)
        except Exception as err:
            self.refuse_session(channel, f"port-forward to localhost:{port}", err)

    def wait_for_member(self, member, frame):
        """An exec into a member whose start has not come yet (its runtime saw it
        running once its relay ran): it waits, bounded, as runc's exec would have
        found the container's process there."""
        waiting = sum(len(frames) for frames in self.execs_waiting.values())
        if waiting >= MOST_EXECS:      # such execs at once: as many as execs
            raise DkvmError(f"no container {member} runs in this pod")
        self.execs_waiting.setdefault(member, []).append(
            (time.monotonic() + MEMBER_WAIT, frame))

    def start_waiting_execs(self, member=None):
        """The execs waiting for `member`, now that it runs; those past MEMBER_WAIT,
        refused."""
        now = time.monotonic()
        for name in list(self.execs_waiting):
            frames = self.execs_waiting[name]
            if name == member:
                del self.execs_waiting[name]
                for _, frame in frames:
                    self.start_exec(frame)
                continue
            for deadline, frame in [entry for entry in frames if entry[0] <= now]:
                frames.remove((deadline, frame))
                self.refuse_session(frame.channel, "exec",
                                    DkvmError(f"no container {name} runs in this pod"))
            if not frames:
                del self.execs_waiting[name]

    def spawn_in_member(self, member_pid):
        def spawn(process, target_pid, stdio):
            return self.spawn_exec(process, target_pid, stdio, fork=lambda:
                                   self.pod_members.fork_in(member_pid, self.workload_pid))
        return spawn

    def start_member(self, frame):
        """A pod member (guest.members): its session is an exec's, its process the
        member's PID 1 in its own root."""
        tag, volumes_held = None, []
        try:
            start = frame.record()
            if start.container_id in self.members or not start.tag or \
                    frame.channel in self.sessions:
                raise DkvmError(f"container {start.container_id} runs already, or has no "
                                "export")
            tag = start.tag
            root = self.pod_members.export_root(tag)
            plan = start.plan
            plan.process.rlimits = self.default_rlimits + plan.process.rlimits
            volumes = self.pod_members.mount_volumes(plan.pod_volumes)
            volumes_held = plan.pod_volumes
            session = ExecSession(
                frame.channel, ExecStart(process=plan.process, winsize=start.winsize),
                self.workload_pid, self.send, spawn=lambda process, _pid, stdio:
                self.pod_members.spawn_member(plan, root, stdio, self.workload_pid, tag,
                                              volumes),
                ptmx=self.pod_members.member_devpts(tag) if plan.process.terminal else None)
        except Exception as err:
            if tag is not None:
                self.pod_members.remove_member(tag, volumes_held)
            self.refuse_session(frame.channel, "the container", err)
            return
        session.member = start
        # its export and volumes go before its status: the container side unplugs them then
        session.on_end = lambda: self.pod_members.remove_member(tag, plan.pod_volumes)
        self.sessions[frame.channel] = session
        self.members[start.container_id] = session
        self.start_waiting_execs(start.container_id)

    def refuse_session(self, channel, what, err):
        log.warn(f"{what} failed: {err!r}")
        message = getattr(err, "message", None) or err
        self.send(wire.encode(wire.STDERR, f"dkvm: {what} failed in the guest: {message}\n"
                              .encode(), channel))
        self.send(wire.encode(wire.EXEC_EXIT, {"status": EXEC_START_FAILED}, channel))

    def close(self):
        _signal.set_wakeup_fd(self.previous_wakeup)
        _signal.signal(_signal.SIGCHLD, self.previous_sigchld)
        os.close(self.wake_r)
        os.close(self.wake_w)


class EarlySignals:
    """Signals for the workload in its first START_GRACE seconds. Under runc a `docker
    kill` right after `docker run -d` finds the workload set up and waiting; here it
    was sent while the VM booted. So a signal waits until the workload blocks, catches
    or ignores it and has gone to sleep (a shell between its `trap` and its `wait`
    would run the trap and then wait on), or until the grace is over (then the
    default action, or nothing for a PID 1, as under runc). In their order; later
    ones go at once."""
    def __init__(self, pid, grace=START_GRACE):
        self.pid = pid
        self.until = time.monotonic() + grace
        self.waiting = []

    def deliver(self, signum):
        self.waiting.append(signum)
        self.deliver_ready()

    def deliver_ready(self):
        over = time.monotonic() >= self.until
        while self.waiting and (over or self.settled(self.waiting[0])):
            try:
                os.kill(self.pid, self.waiting.pop(0))
            except ProcessLookupError:
                self.waiting.clear()

    def settled(self, signum):
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{self.pid}/status", "rb") as f:
                return state != b"R" and handles_signal(f.read(), signum)
        except (OSError, IndexError):
            return True

    def timeout(self, timeout):
        """The loop's poll timeout, shortened while a signal waits."""
        return min(timeout, 0.005) if self.waiting else timeout


def report_exit(control, status):
    """EXIT to the container side, then its EXIT_ACK (or its end, or ACK_WAIT): the
    status must be taken before the VM powers off."""
    write_all(control, wire.encode(wire.EXIT, {"status": status}))
    decoder = wire.Decoder()
    deadline = time.monotonic() + ACK_WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([control], [], [], max(0, deadline - time.monotonic()))
        if not ready:
            continue
        data = os.read(control, 65536)      # EOF: the container side is gone, stop waiting
        if not data or any(f.type == wire.EXIT_ACK
                           for f in wire.feed_tolerant(decoder, data, log.warn)):
            return
