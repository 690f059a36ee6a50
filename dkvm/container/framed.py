"""A non-blocking socket that carries control-channel frames: decoded on the way
in, buffered on the way out, so one slow peer never stalls the others. The buffer
has a bound: a peer that makes it overflow is misbehaving (flow control keeps an
honest one far below it)."""
from dkvm import wire


class QueueFull(Exception):
    pass


class FramedSocket:
    def __init__(self, sock, limit):
        sock.setblocking(False)
        self.sock = sock
        self.decoder = wire.Decoder()
        self.out = bytearray()
        self.limit = limit
        self.closed = False

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
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return []
        return wire.feed_tolerant(self.decoder, data, on_error)

    def close(self):
        self.closed = True
        self.sock.close()
