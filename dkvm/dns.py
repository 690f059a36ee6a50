"""Docker's embedded DNS (127.0.0.11 in the container's namespace) answers for the
other containers of a user-defined network. The guest cannot reach that namespace's
loopback, so a forwarder in the guest takes queries on 127.0.0.11:53 and sends them
over the control channel; the container side asks the embedded server and sends the
answer back. A query is a DNS frame: a 2-byte tag, then the DNS message as is."""
import socket
import struct
import time

EMBEDDED_DNS = ("127.0.0.11", 53)
ANSWER_TIMEOUT = 5
TAG = struct.Struct("!H")


def uses_embedded_dns(resolv_conf="/etc/resolv.conf"):
    try:
        with open(resolv_conf) as f:
            return any(line.split()[:2] == ["nameserver", EMBEDDED_DNS[0]] for line in f)
    except OSError:
        return False


class GuestForwarder:
    """In the guest: listen where the workload's resolv.conf points, tag each query."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(EMBEDDED_DNS)
        self.sock.setblocking(False)
        self.clients = {}               # tag -> (client address, deadline)
        self.next_tag = 0

    def take_query(self):
        """A frame payload for one query received, or None."""
        try:
            data, client = self.sock.recvfrom(65535)
        except BlockingIOError:
            return None
        now = time.monotonic()
        self.clients = {t: c for t, c in self.clients.items() if c[1] > now}
        self.next_tag = (self.next_tag + 1) & 0xFFFF
        self.clients[self.next_tag] = (client, now + ANSWER_TIMEOUT)
        return TAG.pack(self.next_tag) + data

    def give_answer(self, payload):
        (tag,) = TAG.unpack_from(payload)
        client = self.clients.pop(tag, None)
        if client:
            self.sock.sendto(payload[TAG.size:], client[0])


class EmbeddedDnsRelay:
    """On the container side: one UDP socket per query in flight to the embedded DNS."""

    def __init__(self, server=EMBEDDED_DNS):
        self.server = server
        self.pending = {}               # socket -> (tag bytes, deadline)

    def ask(self, payload):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.server)
            sock.send(payload[TAG.size:])
        except OSError:
            sock.close()
            return
        self.pending[sock] = (payload[:TAG.size], time.monotonic() + ANSWER_TIMEOUT)

    def sockets(self):
        now = time.monotonic()
        for sock, (_, deadline) in list(self.pending.items()):
            if deadline < now:          # the client has given up on it too
                del self.pending[sock]
                sock.close()
        return list(self.pending)

    def answer(self, sock):
        """The frame payload answering the query `sock` carried, or None."""
        tag, _ = self.pending.pop(sock)
        try:
            data = sock.recv(65535)
        except OSError:
            data = None
        sock.close()
        return tag + data if data else None
