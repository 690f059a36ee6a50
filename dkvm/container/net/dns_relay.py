"""The container side of Docker's embedded DNS for the guest (guest.dns): each query
the guest sends in a DNS frame is asked of the embedded server, in this namespace,
and its answer goes back tagged as the query was."""
import socket
import time

from dkvm.paths import EMBEDDED_DNS
from dkvm.wire import DNS_ANSWER_TIMEOUT as ANSWER_TIMEOUT
from dkvm.wire import DNS_TAG as TAG

MAX_PENDING = 128       # queries in flight; more are dropped (a resolver asks again)


class EmbeddedDnsRelay:
    """On the container side: one UDP socket per query in flight to the embedded DNS."""

    def __init__(self, server=EMBEDDED_DNS):
        self.server = server
        self.pending = {}               # socket -> (tag bytes, deadline)

    def ask(self, payload):
        if len(payload) <= TAG.size or len(self.sockets()) >= MAX_PENDING:
            return
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
