"""Docker's embedded DNS (127.0.0.11 in the container's namespace) answers for the
other containers of a user-defined network. The guest cannot reach that namespace's
loopback, so a forwarder in the guest takes queries on 127.0.0.11:53 and sends them
over the control channel; the container side asks the embedded server
(container.net.dns_relay) and sends the answer back. A query is a DNS frame: a 2-byte tag
(wire.DNS_TAG), then the DNS message as is."""
import _socket as socket   # not `socket`: it imports enum, a cost in the guest
import time

from dkvm.paths import EMBEDDED_DNS
from dkvm.wire import DNS_ANSWER_TIMEOUT as ANSWER_TIMEOUT
from dkvm.wire import DNS_TAG as TAG

MAX_PENDING = 128       # queries in flight; more are dropped (a resolver asks again), so
                        # that no process in the guest can exhaust init's descriptors


def uses_embedded_dns(resolv_conf="/etc/resolv.conf"):
    try:
        with open(resolv_conf) as f:
            return any(line.split()[:2] == ["nameserver", EMBEDDED_DNS[0]] for line in f)
    except OSError:
        return False


UPSTREAM_GRACE = 0.3    # an upstream answer waits this long for the embedded server's


def positive(message):
    """rcode NOERROR: the server knows the name (even with no record of the asked type)."""
    return len(message) >= 4 and message[3] & 0x0F == 0


class PendingQuery:
    def __init__(self, client, deadline):
        self.client, self.deadline = client, deadline
        self.embedded = self.upstream = None
        self.upstream_at = None
        self.sock = None


class GuestForwarder:
    """In the guest: listen where the workload's resolv.conf points and tag each query.

    Each query goes to Docker's embedded server (over the control channel) and, when
    the host has upstream servers, straight to the first of them: the embedded server
    knows the network's container names, but once the container side has handed its
    address to the VM it can no longer reach upstream for other names. An embedded
    NOERROR answer wins; otherwise (an error, or silence) the upstream answer is given."""

    def __init__(self, upstream=(), listen=EMBEDDED_DNS):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(listen)
        self.sock.setblocking(False)
        self.upstream = (upstream[0], 53) if upstream else None
        self.queries = {}               # tag -> PendingQuery
        self.next_tag = 0

    def sockets(self):
        return [self.sock] + [q.sock for q in self.queries.values() if q.sock]

    def take_query(self):
        """A frame payload for one query received, or None."""
        try:
            data, client = self.sock.recvfrom(65535)
        except BlockingIOError:
            return None
        self.tick()
        if len(self.queries) >= MAX_PENDING:
            return None
        self.next_tag = (self.next_tag + 1) & 0xFFFF
        while self.next_tag in self.queries:
            self.next_tag = (self.next_tag + 1) & 0xFFFF
        query = self.queries[self.next_tag] = PendingQuery(client,
                                                           time.monotonic() + ANSWER_TIMEOUT)
        if self.upstream:
            query.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            query.sock.setblocking(False)
            try:
                query.sock.connect(self.upstream)
                query.sock.send(data)
            except OSError:
                query.sock.close()
                query.sock = None
        return TAG.pack(self.next_tag) + data

    def give_answer(self, payload):
        """The embedded server's answer, from the container side."""
        (tag,) = TAG.unpack_from(payload)
        if tag in self.queries:
            self.queries[tag].embedded = payload[TAG.size:]
            self.decide(tag)

    def read_upstream(self, sock):
        for tag, query in list(self.queries.items()):
            if query.sock is sock:
                try:
                    query.upstream = sock.recv(65535)
                except OSError:
                    query.upstream = None
                sock.close()
                query.sock = None
                query.upstream_at = time.monotonic()
                self.decide(tag)

    def decide(self, tag, now=None):
        now = time.monotonic() if now is None else now
        query = self.queries[tag]
        answer = None
        if query.embedded is not None and (positive(query.embedded) or not self.upstream):
            answer = query.embedded
        elif query.upstream and (query.embedded is not None
                                 or now >= query.upstream_at + UPSTREAM_GRACE):
            answer = query.upstream
        elif query.embedded is not None and query.sock is None and not query.upstream:
            answer = query.embedded     # upstream failed: the embedded answer is all there is
        if answer is not None:
            self.sock.sendto(answer, query.client)
            self.drop(tag)
        elif now > query.deadline:
            self.drop(tag)

    def drop(self, tag):
        query = self.queries.pop(tag)
        if query.sock:
            query.sock.close()

    def serve(self, ready):
        """Handle the readable sockets among `ready`; returns the queries to send to
        the embedded server (frame payloads)."""
        queries = []
        for sock in self.sockets():
            if sock in ready:
                if sock is self.sock:
                    queries.append(self.take_query())
                else:
                    self.read_upstream(sock)
        self.tick()
        return [q for q in queries if q]

    def tick(self):
        for tag in list(self.queries):
            self.decide(tag)

    def timeout(self, default):
        """How long the main loop may sleep before an answer is due."""
        waits = [q.upstream_at + UPSTREAM_GRACE - time.monotonic()
                 for q in self.queries.values() if q.upstream_at is not None]
        return max(0.0, min([default] + waits))
