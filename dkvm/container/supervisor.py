"""The container side of the control channel: one loop, one handler per frame type.

It relays signals, terminal resizes and network changes to the guest, multiplexes
`docker exec` relays onto channels, asks Docker's embedded DNS for the guest, starts
stdin when the guest says hello, and returns the workload's exit status. Frames for
the guest wait until it says hello (it could not take them before).

The loop is an object so that a test drives it with socketpairs: `step()` is one turn.
"""
import itertools
import os
import select
import signal
import socket
import threading
import time

from dkvm import log, wire
from dkvm.container.dns_relay import EmbeddedDnsRelay
from dkvm.container.framed import FramedSocket
from dkvm.errors import DkvmError
from dkvm.schema import Options
from dkvm.terminal import get_size

EXIT_GRACE = 10             # QEMU powering off after the guest reported its exit
IDLE = 0.5                  # the longest a turn sleeps: children and deadlines are checked then
FORWARDED_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2]


class Supervisor:
    def __init__(self, control, exec_listener, network_inbox, vm, signals, terminal=False,
                 stdin_conn=None, boot_timeout=Options().boot_timeout):
        """`vm`: the VM's processes (processes.VmProcesses); `signals`: a
        SignalInbox; `stdin_conn`: QEMU's stdin socket, fed from fd 0 after hello;
        `boot_timeout`: how long the guest may take to say hello (DKVM_BOOT_TIMEOUT)."""
        self.guest = FramedSocket(control)
        self.exec_listener = exec_listener
        self.network_inbox = network_inbox
        self.vm = vm
        self.signals = signals
        self.terminal = terminal
        self.stdin_conn = stdin_conn
        self.dns = EmbeddedDnsRelay()
        self.relays = {}                    # channel -> FramedSocket of an exec relay
        self.last_channel = 0
        self.held = []                      # frames for the guest until it says hello
        self.status = None
        self.exit_deadline = None
        self.vm_ended = False
        self.boot_timeout = boot_timeout
        self.boot_deadline = time.monotonic() + boot_timeout
        self.handlers = {wire.HELLO: self.on_hello, wire.EXIT: self.on_exit,
                         wire.DNS: self.on_dns, wire.ERROR: self.on_error}

    # --- the loop
    def run(self):
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
        peers = [self.guest, *self.relays.values()]
        readable = [self.guest.sock, self.exec_listener, self.network_inbox, self.signals,
                    *(relay.sock for relay in self.relays.values()), *self.dns.sockets()]
        ready_r, ready_w, _ = select.select(readable, [p.sock for p in peers if p.out], [],
                                            timeout)
        if self.signals in ready_r:
            for signum in self.signals.take():
                self.on_signal(signum)
        for peer in peers:
            if peer.sock in ready_w:
                peer.flush()
        if self.network_inbox in ready_r:
            self.to_guest(self.network_inbox.recv(wire.MAX_PAYLOAD))
        if self.exec_listener in ready_r:
            self.accept_relay()
        for sock in ready_r:
            if sock in self.dns.pending:
                answer = self.dns.answer(sock)
                if answer:
                    self.guest.queue(wire.encode(wire.DNS, answer))
        for channel, relay in list(self.relays.items()):
            if relay.sock in ready_r:
                for frame in relay.receive(self.warn):
                    self.to_guest(wire.encode(frame.type, frame.payload, channel))
            if relay.closed:
                relay.close()
                del self.relays[channel]
                self.to_guest(wire.encode(wire.CLOSE, channel=channel))
        if self.guest.sock in ready_r:
            for frame in self.guest.receive(self.warn):
                self.on_guest_frame(frame)
        if not ready_r and not ready_w:
            self.on_idle()

    def on_idle(self):
        self.check_children()
        if self.held is not None and time.monotonic() > self.boot_deadline:
            raise DkvmError(f"the VM did not start the workload within {self.boot_timeout}s "
                            "(DKVM_BOOT_TIMEOUT)"
                            f"{self.vm.exit_reason()}")

    def to_guest(self, data):
        if self.held is None:
            self.guest.queue(data)
        else:
            self.held.append(data)

    # --- events on the container side
    def on_signal(self, signum):
        if signum == signal.SIGWINCH:
            if self.terminal:
                rows, cols = get_size(0) or (0, 0)
                self.to_guest(wire.encode(wire.RESIZE, {"rows": rows, "cols": cols}))
        elif signum == signal.SIGCHLD:
            self.check_children()
        else:
            self.to_guest(wire.encode(wire.SIGNAL, {"signal": signum}))

    def check_children(self):
        """QEMU's end ends the loop (with the status, or an error saying why there is
        none). Before the status, a helper (virtiofsd) dying is an error at once; after
        it, the VM is going anyway (virtiofsd leaves when QEMU does)."""
        if self.vm.ended():
            self.vm_ended = True
        elif self.status is None:
            self.vm.check(helpers_only=True)

    def accept_relay(self):
        self.last_channel = free_channel(self.relays, self.last_channel)
        self.relays[self.last_channel] = FramedSocket(self.exec_listener.accept()[0])

    # --- frames from the guest
    def on_guest_frame(self, frame):
        if frame.channel:
            relay = self.relays.get(frame.channel)
            if relay is not None:
                relay.queue(wire.encode(frame.type, frame.payload))
            return
        handler = self.handlers.get(frame.type)
        if handler is None:
            self.warn(f"unexpected frame type {frame.type} from the guest")
            return
        try:
            handler(frame)
        except wire.ProtocolError as err:
            self.warn(str(err))

    def on_hello(self, frame):
        if self.held is None:
            return
        for data in self.held:
            self.guest.queue(data)
        self.held = None
        if self.stdin_conn is not None:
            start_stdin_relay(self.stdin_conn)

    def on_exit(self, frame):
        self.status = frame.record().status
        self.exit_deadline = time.monotonic() + EXIT_GRACE
        self.guest.queue(wire.encode(wire.EXIT_ACK))

    def on_dns(self, frame):
        self.dns.ask(frame.payload)

    def on_error(self, frame):
        log.warn(printable(frame.record().message))

    @staticmethod
    def warn(message):
        log.warn(f"control channel: {message}")


def printable(text, limit=2000):
    """The guest's words as one line of plain text: no escape sequences reach the
    user's terminal."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


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
