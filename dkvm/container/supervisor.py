"""The container side of the control channel: one loop, one handler per frame type.

It relays signals, terminal resizes and network changes to the guest, multiplexes
`docker exec` relays onto channels, asks Docker's embedded DNS for the guest, starts
stdin when the guest says hello, and returns the workload's exit status. Frames for
the guest wait until it says hello (it could not take them before).

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
from dkvm.errors import DkvmError
from dkvm.schema import MOST_EXECS
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
                 stdin_conn=None, signal_listener=None, restored=False):
        """`vm`: the VM's processes (processes.VmProcesses); `signals`: a
        SignalInbox; `plan`: what the guest asks for first; `stdin_conn`: QEMU's stdin
        socket, fed from fd 0 after hello; `signal_listener`: where the runtime asks
        for the signals it cannot send us (signal_request); `restored`: the VM resumed
        from its template, whose init asked for a plan before it was saved."""
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
        self.unacked = {}                   # channel -> output bytes the relay has not granted
        self.last_channel = 0
        self.held = []                      # frames for the guest until it says hello
        self.held_bytes = 0
        self.status = None
        self.exit_deadline = None
        self.vm_ended = False
        self.boot_timeout = plan.options.boot_timeout
        self.boot_deadline = time.monotonic() + self.boot_timeout
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
        peers = [self.guest, *self.relays.values()]
        poller = select.poll()
        for source in (self.guest, self.exec_listener, self.network_inbox, self.signals,
                       *self.relays.values(), *self.dns.sockets()):
            poller.register(source, POLL_IN)
        if self.signal_listener is not None:
            poller.register(self.signal_listener, POLL_IN)
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
                            "(DKVM_BOOT_TIMEOUT)"
                            f"{self.vm.exit_reason()}")

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
        if len(self.relays) >= self.plan.max_execs:     # what the memory limit has room for
            refuse_relay(conn, f"too many concurrent execs in this container (at most "
                               f"{self.plan.max_execs}); this one was not started")
            return
        self.last_channel = free_channel(self.relays, self.last_channel)
        self.relays[self.last_channel] = FramedSocket(conn, RELAY_QUEUE_LIMIT)
        self.unacked[self.last_channel] = 0

    def on_relay_frame(self, channel, frame):
        if frame.type == wire.WINDOW:
            try:
                self.unacked[channel] = max(0, self.unacked[channel] - frame.record().bytes)
            except wire.ProtocolError as err:
                self.warn(str(err))
                return
        self.to_guest(wire.encode(frame.type, frame.payload, channel))

    def drop_relay(self, channel):
        self.relays.pop(channel).close()
        del self.unacked[channel]
        self.to_guest(wire.encode(wire.CLOSE, channel=channel))

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
        self.vm.release_kernel_image(self.plan.boot)

    def on_hello(self, frame):
        if self.held is None:
            return
        self.last_heard = time.monotonic()
        held, self.held = self.held, None
        for data in held:
            self.to_guest(data)
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
