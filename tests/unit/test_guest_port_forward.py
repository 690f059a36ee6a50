"""guest.port_forward: a pod's port-forward in the guest, driven through the guest's
loop over a socketpair (harness.GuestHarness) against real servers on this
machine's localhost: bytes both ways within the window, the half close, the
server's end and reset, a port nothing listens on, the relay's CLOSE."""
import socket
import struct
import threading

import pytest

from harness import CHANNEL, GuestHarness, WAIT, pattern
from dkvm.wire import CLOSE, STDERR, STDIN, STDOUT, STREAM_WINDOW


class Server:
    """One connection on localhost, served by `handle(conn)` in a thread."""

    def __init__(self, handle, family=socket.AF_INET, address="127.0.0.1"):
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((address, 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.handle, self.seen = handle, []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.listener.accept()
        with conn:
            self.handle(conn, self.seen)

    def close(self):
        self.thread.join(WAIT)
        self.listener.close()
        assert not self.thread.is_alive()


def echo_until_eof(conn, seen):
    while data := conn.recv(1 << 16):
        seen.append(data)
        conn.sendall(data)


@pytest.fixture
def guest_forward():
    made = []

    def start(server):
        made.append((server, GuestHarness()))
        return made[-1][1].start_forward(server.port)
    yield start
    for server, harness in made:
        harness.close()
        server.close()


def test_bytes_go_both_ways_past_the_window_and_the_half_close_ends_it(guest_forward):
    total = 3 * STREAM_WINDOW + 777
    g = guest_forward(Server(echo_until_eof))
    data = pattern(total)
    for start in range(0, total, 60000):
        g.send(STDIN, data[start:start + 60000])
    g.send(STDIN, b"")                   # the client's end: the server sees EOF, ends
    assert g.finish() == 0
    assert g.payload(STDOUT) == data and g.payload(STDERR) == b""
    assert g.windows() == total          # every stdin byte taken was granted back


def test_the_servers_reset_ends_the_session_with_status_1(guest_forward):
    def reset_after_hello(conn, seen):
        conn.sendall(b"hello")
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    g = guest_forward(Server(reset_after_hello))
    g.send(STDIN, b"x")
    assert g.finish() == 1
    assert g.payload(STDOUT) == b"hello"


def test_an_ipv6_only_server_is_reached_on_its_loopback(guest_forward):
    def greet(conn, seen):
        conn.sendall(b"six")
    try:
        server = Server(greet, socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    g = guest_forward(server)
    assert g.finish() == 0 and g.payload(STDOUT) == b"six"


def test_a_port_nothing_listens_on_ends_at_once_saying_so():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))         # bound, never listening: refused
    port = probe.getsockname()[1]
    g = GuestHarness()
    try:
        g.start_forward(port)
        assert g.exits() == [126] and g.session is None
        assert f"localhost:{port}".encode() in g.payload(STDERR)
        assert CHANNEL not in g.loop.sessions
    finally:
        g.close()
        probe.close()


def test_the_relays_close_ends_the_connection_without_a_status(guest_forward):
    g = guest_forward(Server(echo_until_eof))
    g.send(STDIN, b"ping")
    g.run_until(lambda: g.payload(STDOUT) == b"ping", auto_ack=True)
    g.send(CLOSE)
    g.run_until(lambda: g.ended())
    g.idle(0.1)
    assert g.exits() == []               # nobody is left to hear it
