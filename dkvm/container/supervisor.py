"""The container side of the control channel: one loop, one handler per frame type.

It relays signals, terminal resizes and network changes to the guest, multiplexes
`docker exec` relays onto channels, asks Docker's embedded DNS for the guest, starts
stdin when the guest says hello, and returns the workload's exit status. Frames for
the guest wait until it says hello (it could not take them before). A pod's sandbox
(host.pods) also takes the pod's members on POD_SOCKET, a channel each like an exec:
each member's export is hot-plugged (member_exports) before its MEMBER_START, with
the export's tag, reaches the guest, and unplugged once the member has gone.

The guest is not trusted: every frame it sends is checked before use, the data it
sends an exec is held to that exec's flow-control window, and every queue has a
bound. A guest that breaks the protocol ends its container with one line saying how.
(The exec relays are the container side's own: their garbage is reported and
dropped.)

The loop is an object so that a test drives it with socketpairs: `step()` is one turn.
"""
import itertools
import os
import select
import signal
import socket
import threading
import time

from dkvm import log, signal_request, wire
from dkvm.container.net.dns_relay import EmbeddedDnsRelay
from dkvm.container.framed import FramedSocket, QueueFull
from dkvm.container.member_exports import member_tag
from dkvm.container.pod_volumes import PodVolumes
from dkvm.errors import DkvmError
from dkvm.schema import MOST_EXECS, MOST_POD_VOLUMES
from dkvm.terminal import get_size

EXIT_GRACE = 10             # QEMU powering off after the guest reported its exit
IDLE = 0.5                  # the longest a turn sleeps: children and deadlines are checked then
STALL = 5                   # a turn this late: this process was frozen (docker pause), not the VM
REQUEST_WAIT = 1            # the runtime writing its signal request
MAX_KILLERS = 16            # runtimes waiting at once for the workload to die
# virtiofsd's descriptors (one per inode the guest knows): looked at every turn (at
# least every IDLE), and past this share of its limit the guest is asked to let go of
# unused inodes (at most once per RELEASE_INTERVAL). Each new inode is a lookup, a round
# trip to virtiofsd (no readdirplus under a low limit: vmm); a guest making files as
# fast as it can made 850 a second under TCG, so the 40% left of 20000 lasts seconds.
DESCRIPTOR_CHECK = 0.25
DESCRIPTOR_HIGH_WATER = 0.6
RELEASE_INTERVAL = 1
# A member whose relay left is unplugged once the guest reports its end (EXEC_EXIT: it
# has let go of the export), or after this long without that word.
MEMBER_END_WAIT = 30        # s: a member whose relay went, its guest end not heard: unplugged then
ENTROPY_BYTES = 32          # the guest's reseed: a restored VM's random state is its template's
# What may wait to be sent: to a relay, its window of output and the guest's small
# frames; to the guest, each relay's window of stdin and the rest (signals, DNS
# answers, network changes).
RELAY_QUEUE_LIMIT = 2 * wire.STREAM_WINDOW
GUEST_QUEUE_LIMIT = MOST_EXECS * RELAY_QUEUE_LIMIT + (8 << 20)
# frame types the guest may send on an exec's channel, and on channel 0
TO_RELAY = {wire.STDOUT, wire.STDERR, wire.WINDOW, wire.EXEC_EXIT}
POLL_IN, POLL_OUT = select.POLLIN | select.POLLHUP | select.POLLERR, select.POLLOUT
# (a socket whose peer is gone polls as POLLHUP/POLLERR: reading it says so)


class GuestMisbehaved(DkvmError):
    def __init__(self, what):
        super().__init__(f"the guest broke the control protocol ({what}); the VM is stopped")


class Supervisor:
    def __init__(self, control, exec_listener, network_inbox, vm, signals, plan,
                 stdin_conn=None, signal_listener=None, restored=False, pod_listener=None,
                 exports=None):
        """`vm`: the VM's processes (processes.VmProcesses); `signals`: a
        SignalInbox; `plan`: what the guest asks for first; `stdin_conn`: QEMU's stdin
        socket, fed from fd 0 after hello; `signal_listener`: where the runtime asks
        for the signals it cannot send us (signal_request); `restored`: the VM resumed
        from its template, whose init asked for a plan before it was saved;
        `pod_listener`, `exports`: a pod's sandbox, where the members connect, and
        what hot-plugs their exports (member_exports.MemberExports)."""
        self.guest = FramedSocket(control, GUEST_QUEUE_LIMIT)
        self.exec_listener = exec_listener
        self.signal_listener = signal_listener
        self.killers = []                   # runtimes waiting for the workload to die
        self.network_inbox = network_inbox
        self.vm = vm
        self.signals = signals
        self.plan = plan
        self.restored = restored
        self.terminal = plan.process.terminal
        self.stdin_conn = stdin_conn
        self.dns = EmbeddedDnsRelay()
        self.relays = {}                    # channel -> FramedSocket of an exec relay
        self.pod_listener = pod_listener
        self.exports = exports
        self.members = {}                   # channel -> Member (a pod's, until unplugged)
        self.volumes = PodVolumes()         # the pod's volumes: one export each
        self.unstarted = set()              # pod channels before their first frame
        self.unheard = set()                # channels the guest has not heard of yet
        self.members_started = 0            # for each export's tag: never one reused
        self.unacked = {}                   # channel -> output bytes the relay has not granted
        self.last_channel = 0
        self.held = []                      # frames for the guest until it says hello
        self.held_bytes = 0
        self.status = None
        self.exit_deadline = None
        self.vm_ended = False
        self.boot_timeout = plan.options.boot_timeout
        self.boot_deadline = time.monotonic() + self.boot_timeout
        self.plan_sent = None               # when, for a boot timeout's message
        self.watchdog = plan.options.watchdog
        self.last_heard = None              # the guest's last frame, once it said hello
        self.last_turn = time.monotonic()
        self.next_descriptor_check = self.quiet_until = 0
        self.handlers = {wire.INIT: self.on_init, wire.HELLO: self.on_hello,
                         wire.EXIT: self.on_exit, wire.DNS: self.on_dns,
                         wire.ERROR: self.on_error, wire.HEARTBEAT: self.on_heartbeat}

    # --- the loop
    def run(self):
        if self.restored:
            self.send_plan()
        while not self.finished():
            self.step()
        return self.result()

    def finished(self):
        if self.guest.closed or self.vm_ended:
            return True
        if self.exit_deadline is not None:
            return time.monotonic() >= self.exit_deadline
        return False

    def result(self):
        if self.status is None:
            self.vm.wait(EXIT_GRACE)
            raise DkvmError("the VM stopped without reporting the workload's exit status"
                            f"{self.vm.exit_reason()}; run with DKVM_KERNEL_DEBUG=1 to see "
                            "the boot log")
        return self.status

    def step(self, timeout=IDLE):
        """One turn: wait (poll: no limit on descriptor numbers) for what can be read or
        written, then handle it."""
        self.check_watchdog()
        self.check_descriptors()
        self.check_members()
        peers = [self.guest, *self.relays.values()]
        poller = select.poll()
        for source in (self.guest, self.exec_listener, self.network_inbox, self.signals,
                       *self.heard_relays(), *self.dns.sockets()):
            poller.register(source, POLL_IN)
        for source in (self.signal_listener, self.pod_listener,
                       self.exports and self.exports.inbox):
            if source is not None:
                poller.register(source, POLL_IN)
        for peer in peers:
            if peer.out:
                poller.register(peer, POLL_IN | POLL_OUT)
        events = dict(poller.poll(timeout * 1000))
        if not events:
            self.on_idle()
            return

        def ready(source, mask=POLL_IN):
            return events.get(source.fileno(), 0) & mask

        if ready(self.signals):
            for signum, sender in self.signals.take():
                self.on_signal(signum, sender)
        if self.signal_listener is not None and ready(self.signal_listener):
            self.accept_signal_request()
        for peer in peers:
            if ready(peer, POLL_OUT):
                peer.flush()
        if ready(self.network_inbox):
            self.to_guest(self.network_inbox.recv(wire.MAX_PAYLOAD))
        if ready(self.exec_listener):
            self.accept_relay()
        if self.pod_listener is not None and ready(self.pod_listener):
            self.accept_pod_relay()
        if self.exports is not None and ready(self.exports.inbox):
            for channel, tag, error in self.exports.outcomes():
                self.on_plugged(channel, tag, error)
        for sock in list(self.dns.pending):
            if ready(sock):
                answer = self.dns.answer(sock)
                if answer:
                    self.to_guest(wire.encode(wire.DNS, answer))
        for channel, relay in list(self.relays.items()):
            if ready(relay):
                for frame in relay.receive(self.warn):
                    self.on_relay_frame(channel, frame)
            if relay.closed:
                self.drop_relay(channel)
        if ready(self.guest):
            for frame in self.guest.receive(self.guest_garbage):
                self.on_guest_frame(frame)

    def on_idle(self):
        self.check_children()
        if self.held is not None and time.monotonic() > self.boot_deadline:
            raise DkvmError(f"the VM did not start the workload within {self.boot_timeout}s "
                            f"(DKVM_BOOT_TIMEOUT; {self.boot_stage()})"
                            f"{self.vm.exit_reason()}")

    def boot_stage(self):
        """How far the boot came, for its timeout's message."""
        if self.plan_sent is None:
            return "the guest had not asked for its plan"
        return f"the plan was sent {time.monotonic() - self.plan_sent:.0f}s before"

    def check_watchdog(self):
        """A guest that has said hello speaks at least every wire.HEARTBEAT_INTERVAL. One
        silent for DKVM_WATCHDOG seconds is hung (its kernel or its init): the container
        ends with that said, not a `docker run` that never returns. Time this process
        itself was frozen (`docker pause` freezes the VM with it) does not count."""
        now = time.monotonic()
        if now - self.last_turn > STALL and self.last_heard is not None:
            self.last_heard = now
        self.last_turn = now
        if self.last_heard is not None and self.status is None and \
                now - self.last_heard > self.watchdog:
            raise DkvmError(f"the VM stopped answering: no word from its init for "
                            f"{self.watchdog}s (DKVM_WATCHDOG); it was stopped"
                            f"{self.vm.exit_reason()}")

    def check_descriptors(self):
        """virtiofsd near its descriptor limit (the guest's kernel keeps the inodes it
        read or made cached, and virtiofsd a descriptor for each): the guest lets go
        of those nothing uses, before it would get EMFILE for every new file."""
        now = time.monotonic()
        if self.held is not None or now < self.next_descriptor_check:
            return
        self.next_descriptor_check = now + DESCRIPTOR_CHECK
        used, most = self.vm.virtiofsd_descriptors()
        if self.exports is not None:            # a pod's members' exports: theirs too
            used = max(used, self.exports.most_descriptors_open())
        if used > most * DESCRIPTOR_HIGH_WATER and now >= self.quiet_until:
            self.quiet_until = now + RELEASE_INTERVAL
            self.send_to_guest(wire.encode(wire.RELEASE))

    def to_guest(self, data):
        if self.held is not None:
            self.held_bytes += len(data)
            if self.held_bytes > GUEST_QUEUE_LIMIT:
                raise DkvmError(f"more than {GUEST_QUEUE_LIMIT} bytes for the guest waited "
                                "for it to start")
            self.held.append(data)
            return
        self.send_to_guest(data)

    def send_to_guest(self, data):
        try:
            self.guest.queue(data)
        except QueueFull as err:
            raise GuestMisbehaved(f"it stopped reading its control channel: {err}") from None

    def check_children(self):
        """QEMU's end ends the loop (with the status, or an error saying why there is
        none). Before the status, a helper (virtiofsd) dying is an error at once; after
        it, the VM is going anyway (virtiofsd leaves when QEMU does)."""
        if self.vm.ended():
            self.vm_ended = True
        elif self.status is None:
            self.vm.check(helpers_only=True)

    # --- events on the container side
    def on_signal(self, signum, sender=0):
        """A signal is the workload's, but for the ones we cause: our own (SIGPIPE)
        and our children's SIGCHLD, which says one ended. With a terminal, SIGWINCH
        is its new size, which the guest's console passes on."""
        if signum == signal.SIGCHLD:
            self.check_children()
        if sender == os.getpid() or (signum == signal.SIGCHLD and sender != 0):
            return
        if signum == signal.SIGWINCH and self.terminal:
            rows, cols = get_size(0) or (0, 0)
            self.to_guest(wire.encode(wire.RESIZE, {"rows": rows, "cols": cols}))
        else:
            self.to_guest(wire.encode(wire.SIGNAL, {"signal": signum}))

    def accept_signal_request(self):
        """The runtime, at `runc kill` with SIGKILL or SIGSTOP (host.kill): the signal
        goes to the workload in the guest. For SIGKILL the runtime's connection stays
        open until we exit, so that it kills the VM only once the guest's kernel has
        closed the workload's sockets (peers see them close, as under runc); before
        the guest's hello there is no workload yet, and nothing to wait for."""
        conn = self.signal_listener.accept()[0]
        conn.settimeout(REQUEST_WAIT)
        try:
            signum = signal_request.parse(conn.recv(signal_request.MAX_REQUEST))
        except (OSError, ValueError) as err:
            conn.close()
            self.warn(f"signal request: {err}")
            return
        waits = signum == signal.SIGKILL and self.held is None and \
            len(self.killers) < MAX_KILLERS
        self.to_guest(wire.encode(wire.SIGNAL, {"signal": signum}))
        if waits:
            self.killers.append(conn)
        else:
            conn.close()

    def accept_relay(self):
        conn = self.exec_listener.accept()[0]
        if self.exec_count() >= self.plan.max_execs:    # what the memory limit has room for
            refuse_relay(conn, f"too many concurrent execs in this container (at most "
                               f"{self.plan.max_execs}); this one was not started")
            return
        self.add_relay(FramedSocket(conn, RELAY_QUEUE_LIMIT))

    def add_relay(self, relay):
        self.last_channel = free_channel(self.relays.keys() | self.members.keys(),
                                         self.last_channel)
        self.relays[self.last_channel] = relay
        self.unacked[self.last_channel] = 0
        return self.last_channel

    def exec_count(self):
        return sum(1 for channel in self.relays
                   if channel not in self.members and channel not in self.unstarted)

    def heard_relays(self):
        """The relays to read: a member's waits for its export (its frames would
        reach the guest before its MEMBER_START)."""
        return [relay for channel, relay in self.relays.items()
                if channel not in self.members or self.members[channel].plugged]

    def on_relay_frame(self, channel, frame):
        if self.relays[channel].closed:         # refused: the rest of its frames too
            return
        if channel in self.unstarted:
            self.start_pod_channel(channel, frame)
            return
        if frame.type == wire.MEMBER_START:
            self.refuse_channel(channel, "MEMBER_START begins a pod's channel, once")
            return
        if frame.type == wire.WINDOW:
            try:
                self.unacked[channel] = max(0, self.unacked[channel] - frame.record().bytes)
            except wire.ProtocolError as err:
                self.warn(str(err))
                return
        data = wire.encode(frame.type, frame.payload, channel)
        member = self.members.get(channel)
        if member is not None and not member.plugged:
            member.held.append(data)            # what came in one read with its start
        else:
            self.to_guest(data)

    def drop_relay(self, channel):
        self.relays.pop(channel).close()
        del self.unacked[channel]
        self.unstarted.discard(channel)
        if channel in self.unheard:
            self.unheard.discard(channel)
        else:
            self.to_guest(wire.encode(wire.CLOSE, channel=channel))
        member = self.members.get(channel)
        if member is not None:
            member.gone_at = time.monotonic()
            if not member.submitted:            # never plugged: nothing to undo
                del self.members[channel]
                member.close()
            else:
                self.unplug_when_done(channel)

    def refuse_channel(self, channel, message):
        """A relay's one line and its end (drop_relay follows in this turn)."""
        relay = self.relays[channel]
        refuse_relay(relay.sock, message)
        relay.closed = True

    # --- a pod's members (a sandbox's supervisor)
    def accept_pod_relay(self):
        conn = self.pod_listener.accept()[0]
        if len(self.relays) >= MOST_EXECS + self.plan.max_execs:
            refuse_relay(conn, "too many containers and execs in this pod at once")
            return
        channel = self.add_relay(FramedSocket(conn, RELAY_QUEUE_LIMIT, takes_fds=True))
        self.unstarted.add(channel)
        self.unheard.add(channel)

    def start_pod_channel(self, channel, frame):
        """A pod channel's first frame: an exec into a member (EXEC_START, passed on as
        it is) or a member's start, with its export."""
        fds = self.relays[channel].take_fds()
        self.unstarted.discard(channel)
        if frame.type == wire.EXEC_START and not fds:
            if self.exec_count() > self.plan.max_execs:
                self.refuse_channel(channel, f"too many concurrent execs in this pod (at most "
                                             f"{self.plan.max_execs}); this one was not started")
                return
            self.unheard.discard(channel)
            self.on_relay_frame(channel, frame)
            return
        try:
            start = self.member_start(frame, fds)
        except DkvmError as err:
            for fd in fds:
                os.close(fd)
            self.refuse_channel(channel, err.message)
            return
        start.tag = member_tag(self.members_started)
        self.members_started += 1
        member = self.members[channel] = Member(start, fds)
        if self.held is None:                   # else at hello: no device before the guest runs
            self.plug(channel, member)

    def member_start(self, frame, fds):
        """The MEMBER_START a channel begins with, checked; DkvmError saying what is wrong."""
        if frame.type == wire.EXEC_START:
            raise DkvmError("an exec into a member carries no descriptor")
        if frame.type != wire.MEMBER_START:
            raise DkvmError(f"a pod's channel starts with MEMBER_START or EXEC_START, not "
                            f"frame type {frame.type}")
        try:
            start = frame.record()
        except wire.ProtocolError as err:
            raise DkvmError(f"a member's start: {err}") from None
        volumes = len(start.plan.pod_volumes)
        if volumes > MOST_POD_VOLUMES or len(fds) != 2 + volumes or \
                not is_export(*fds[:2]) or not all(map(is_directory, fds[2:])):
            raise DkvmError(f"a member's start comes with its export: its directory, its "
                            f"mount namespace and its {volumes} volumes (at most "
                            f"{MOST_POD_VOLUMES}; {len(fds)} descriptors came)")
        if not start.container_id:
            raise DkvmError("a member's start names no container")
        running = [m for m in self.members.values() if m.gone_at is None]
        if any(m.container_id == start.container_id for m in running):
            raise DkvmError(f"container {start.container_id} runs in this pod already")
        if len(running) >= MOST_EXECS:
            raise DkvmError(f"too many containers in this pod (at most {MOST_EXECS}); "
                            "this one was not started")
        return start

    def plug(self, channel, member):
        """The member's export, and its volumes not plugged yet (pod_volumes: one
        export each for the pod, shared), each with a hold on its mount namespace."""
        member.submitted = True
        export, member.export = member.export, []
        tags, new, member.waits = self.volumes.claim(channel, export[2:])
        for volume, tag in zip(member.start.plan.pod_volumes, tags):
            volume.tag = tag
        member.waits.add(member.tag)
        volume_exports = [(tag, (fd, os.dup(export[1]))) for tag, fd in new]
        self.exports.plug(channel, member.tag, export[:2])     # the namespace is its now
        for tag, volume_export in volume_exports:
            self.exports.plug(0, tag, volume_export)

    def on_plugged(self, channel, tag, error):
        """An export plugged (or not): a member's start goes to the guest, with what
        its relay sent after it, once its export and its volumes are in."""
        if channel == 0:                        # a volume's
            waiting, unused = self.volumes.on_plugged(tag, error)
            if unused:
                self.exports.unplug(tag)
            for member_channel in waiting:
                self.member_plugged(member_channel, tag, error)
            return
        member = self.members.get(channel)
        if member is not None and member.tag == tag:
            self.member_plugged(channel, tag, error)

    def member_plugged(self, channel, tag, error):
        """One of the member's plugs is done (its export's, or a volume's): once its own
        export's is, a member whose relay left or whose plug failed is let go of, and
        one whose plugs all succeeded starts."""
        member = self.members.get(channel)
        if member is None or tag not in member.waits:
            return
        member.waits.discard(tag)
        member.error = member.error or error
        if tag == member.tag and not error:
            member.export_plugged = True
        if member.tag in member.waits:          # its own outcome decides what is undone
            return
        if member.gone_at is not None or member.error:
            del self.members[channel]
            if member.export_plugged:
                self.exports.unplug(member.tag)
            self.release_volumes(channel)
            if member.gone_at is None:
                self.refuse_channel(channel, f"the pod's VM cannot take this container's "
                                             f"files: {member.error}")
                self.drop_relay(channel)
            return
        if member.waits:
            return
        member.plugged = True
        self.unheard.discard(channel)
        self.to_guest(wire.encode(wire.MEMBER_START, member.start, channel))
        for data in member.held:
            self.to_guest(data)
        member.held = []

    def release_volumes(self, channel):
        for tag in self.volumes.release(channel):
            self.exports.unplug(tag)

    def unplug_when_done(self, channel):
        """Once its relay has gone and the guest is done with it (or has had time)."""
        member = self.members[channel]
        if not member.plugged or member.gone_at is None:
            return
        if member.exited or time.monotonic() - member.gone_at > MEMBER_END_WAIT:
            del self.members[channel]
            self.exports.unplug(member.tag)
            self.release_volumes(channel)

    def check_members(self):
        for channel in [c for c, m in self.members.items() if m.gone_at is not None]:
            self.unplug_when_done(channel)

    # --- frames from the guest
    def on_guest_frame(self, frame):
        if self.last_heard is not None:
            self.last_heard = time.monotonic()
        if frame.channel:
            self.to_relay(frame)
            return
        handler = self.handlers.get(frame.type)
        if handler is None:
            raise GuestMisbehaved(f"frame type {frame.type} on channel 0")
        try:
            handler(frame)
        except wire.ProtocolError as err:
            raise GuestMisbehaved(str(err)) from None

    def to_relay(self, frame):
        """An exec's frame, checked and held to its window; one for an exec whose relay
        has gone (it may still be on its way) is dropped."""
        if frame.type not in TO_RELAY:
            raise GuestMisbehaved(f"frame type {frame.type} on exec channel {frame.channel}")
        if frame.type in (wire.WINDOW, wire.EXEC_EXIT):
            try:
                frame.record()
            except wire.ProtocolError as err:
                raise GuestMisbehaved(str(err)) from None
        member = self.members.get(frame.channel)
        if frame.type == wire.EXEC_EXIT and member is not None and member.plugged:
            member.exited = True                # it has let go of its export
            self.unplug_when_done(frame.channel)
        relay = self.relays.get(frame.channel)
        if relay is None:
            return
        if frame.type in (wire.STDOUT, wire.STDERR):
            self.unacked[frame.channel] += len(frame.payload)
            if self.unacked[frame.channel] > wire.STREAM_WINDOW:
                raise GuestMisbehaved(f"{self.unacked[frame.channel]} bytes for exec channel "
                                      f"{frame.channel} beyond its window of "
                                      f"{wire.STREAM_WINDOW}")
        try:
            relay.queue(wire.encode(frame.type, frame.payload))
        except QueueFull as err:
            raise GuestMisbehaved(f"exec channel {frame.channel}: {err}") from None

    def guest_garbage(self, message):
        raise GuestMisbehaved(message)

    def on_init(self, frame):
        """The guest's init asks for its plan: not held, it is what lets the guest
        say hello."""
        self.send_plan()

    def send_plan(self):
        """The plan, with the time and fresh entropy (a restored VM has its template's).
        The guest's kernel runs by now: QEMU's copy of the image can go."""
        self.plan.wall_clock_ns = time.time_ns()
        self.plan.entropy = os.urandom(ENTROPY_BYTES).hex()
        self.send_to_guest(wire.encode(wire.PLAN, self.plan))
        self.plan_sent = time.monotonic()
        self.vm.release_kernel_image(self.plan.boot)

    def on_hello(self, frame):
        if self.held is None:
            return
        self.last_heard = time.monotonic()
        held, self.held = self.held, None
        for data in held:
            self.to_guest(data)
        for channel, member in self.members.items():
            if not member.submitted:
                self.plug(channel, member)
        if self.stdin_conn is not None:
            start_stdin_relay(self.stdin_conn)

    def on_exit(self, frame):
        self.status = frame.record().status
        self.exit_deadline = time.monotonic() + EXIT_GRACE
        self.to_guest(wire.encode(wire.EXIT_ACK))

    def on_dns(self, frame):
        self.dns.ask(frame.payload)

    def on_heartbeat(self, frame):
        pass                        # what it says is that it came (on_guest_frame)

    def on_error(self, frame):
        log.warn(printable(frame.record().message))

    @staticmethod
    def warn(message):
        log.warn(f"control channel: {message}")


def printable(text, limit=2000):
    """The guest's words as one line of plain text: no escape sequences reach the
    user's terminal."""
    return log.printable(text[:limit])


def refuse_relay(conn, message):
    """The relay's one line (an ERROR frame on its own socket, which its fresh buffer
    takes at once), then its socket closed: the exec fails as runc's failed execs do,
    and its relay process is gone a moment later."""
    try:
        conn.setblocking(False)
        conn.send(wire.encode(wire.ERROR, {"message": message}))
    except OSError:
        pass
    conn.close()


class Member:
    """A pod member's channel as the supervisor follows it: its MEMBER_START (its
    export's tag, its volumes' once claimed: sent to the guest once they are all
    plugged, `waits` holding those not yet), the relay's frames that came in the same
    read (held until then); `export` its export's descriptors (directory, mount
    namespace, volumes) until the plug is asked for (`submitted`); `exited`: the guest
    reported its end; `gone_at`: its relay left."""

    def __init__(self, start, export):
        self.start, self.container_id, self.tag = start, start.container_id, start.tag
        self.export = export
        self.held = []
        self.waits = set()
        self.error = ""
        self.submitted = self.export_plugged = self.plugged = self.exited = False
        self.gone_at = None

    def close(self):
        for fd in self.export:
            os.close(fd)
        self.export = []


NS_GET_NSTYPE = 0xB703      # ioctl: a namespace descriptor's kind (linux/nsfs.h)
CLONE_NEWNS = 0x20000       # that kind for a mount namespace (os has it from Python 3.12)


def is_directory(fd):
    import stat
    try:
        return stat.S_ISDIR(os.fstat(fd).st_mode)
    except OSError:
        return False


def is_export(directory, namespace):
    """Whether two descriptors are a directory and a mount namespace, as a member's
    relay sends its export (pod_member.export_fds)."""
    import fcntl
    import stat
    try:
        return stat.S_ISDIR(os.fstat(directory).st_mode) and \
            stat.S_ISREG(os.fstat(namespace).st_mode) and \
            fcntl.ioctl(namespace, NS_GET_NSTYPE) == CLONE_NEWNS
    except OSError:
        return False


def free_channel(relays, last=0):
    """The first free channel after `last`: one just given up comes back last, as
    frames of its old exec may still be on their way from the guest."""
    return next(c for c in itertools.chain(range(last + 1, 1 << 16), range(1, last + 1))
                if c not in relays)


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
