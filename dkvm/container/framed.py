"""A non-blocking socket that carries control-channel frames: decoded on the way
in, buffered on the way out, so one slow peer never stalls the others. The buffer
has a bound: a peer that makes it overflow is misbehaving (flow control keeps an
honest one far below it). One that `takes_fds` keeps the descriptors that came with
its data (SCM_RIGHTS: a pod member's export, with its first frame) until they are
taken; any other socket's are closed by the kernel as they are read."""
import os
import socket

from dkvm import wire
from dkvm.schema import MOST_POD_VOLUMES

# a member's export: its directory, its mount namespace and its volumes; one more shows
# an error
MOST_FDS = 2 + MOST_POD_VOLUMES + 1


class QueueFull(Exception):
    pass


class FramedSocket:
    def __init__(self, sock, limit, takes_fds=False):
        sock.setblocking(False)
        self.sock = sock
        self.decoder = wire.Decoder()
        self.out = bytearray()
        self.limit = limit
        self.closed = False
        self.takes_fds = takes_fds
        self.fds = []

    def fileno(self):
        return self.sock.fileno()

    def queue(self, data):
        if len(self.out) + len(data) > self.limit:
            raise QueueFull(f"more than {self.limit} bytes waiting to be sent")
        self.out += data

    def flush(self):
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return
            except OSError:
                self.out.clear()
                self.closed = True
                return
            del self.out[:sent]

    def receive(self, on_error):
        """The frames that arrived now; none, and `closed` set, at end of stream."""
        try:
            if self.takes_fds:
                data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, MOST_FDS,
                                                  socket.MSG_CMSG_CLOEXEC)
                if len(self.fds) + len(fds) > MOST_FDS:     # a start has MOST_FDS at most
                    for fd in fds:
                        os.close(fd)
                    data = b""
                else:
                    self.fds += fds
            else:
                data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return []
        return wire.feed_tolerant(self.decoder, data, on_error)

    def take_fds(self):
        """The descriptors received so far, now the caller's; no more are taken."""
        fds, self.fds, self.takes_fds = self.fds, [], False
        return fds

    def close(self):
        self.closed = True
        self.sock.close()
        for fd in self.take_fds():
            os.close(fd)
