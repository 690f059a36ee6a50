"""The guest's DNS forwarder: Docker's embedded answer for container names, the
host's upstream answer for the rest."""
import socket
import struct
import time

from dkvm.guest import dns
from waiting import wait_until


def message(txid, rcode=0, answers=0):
    return struct.pack("!HHHHHH", txid, 0x8180 | rcode, 1, answers, 0, 0) + b"\x00payload"


def test_positive():
    assert dns.positive(message(1, answers=1))
    assert dns.positive(message(1, answers=0))          # NODATA: the name exists
    assert not dns.positive(message(1, rcode=3, answers=1))
    assert not dns.positive(message(1, rcode=2))
    assert not dns.positive(b"\x00")


class Upstream:
    """A UDP server on loopback that answers every query with `reply`."""

    def __init__(self, reply):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.reply = reply

    def answer_one(self):
        data, peer = self.sock.recvfrom(65535)
        self.sock.sendto(self.reply, peer)
        return data


def forwarder_and_client(upstream_port=None):
    fwd = dns.GuestForwarder(listen=("127.0.0.1", 0))
    if upstream_port:       # upstream servers listen on port 53; the test's on any port
        fwd.upstream = ("127.0.0.1", upstream_port)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    return fwd, client


def ask(fwd, client, query):
    client.sendto(query, fwd.sock.getsockname())
    return wait_until(fwd.take_query, "the forwarder to take the query", timeout=5,
                      interval=0.01)


def pump_upstream(fwd, until, timeout=5):
    def pumped():
        for sock in fwd.sockets()[1:]:
            fwd.read_upstream(sock)
        fwd.tick()
        return until()
    wait_until(pumped, "the forwarder to answer", timeout=timeout, interval=0.01)


def test_embedded_answer_with_records_wins():
    upstream = Upstream(message(7, rcode=3))
    fwd, client = forwarder_and_client(upstream.sock.getsockname()[1])
    payload = ask(fwd, client, message(7))
    assert payload[dns.TAG.size:] == message(7) == upstream.answer_one()
    fwd.give_answer(payload[:dns.TAG.size] + message(7, answers=1))
    assert client.recv(100) == message(7, answers=1)
    assert fwd.queries == {}


def test_upstream_answer_when_the_embedded_server_has_none():
    upstream = Upstream(message(8, answers=2))
    fwd, client = forwarder_and_client(upstream.sock.getsockname()[1])
    payload = ask(fwd, client, message(8))
    upstream.answer_one()
    fwd.give_answer(payload[:dns.TAG.size] + message(8, rcode=2))      # SERVFAIL
    pump_upstream(fwd, lambda: not fwd.queries)
    assert client.recv(100) == message(8, answers=2)


def test_upstream_answer_after_a_grace_when_the_embedded_server_is_silent():
    upstream = Upstream(message(9, answers=1))
    fwd, client = forwarder_and_client(upstream.sock.getsockname()[1])
    ask(fwd, client, message(9))
    upstream.answer_one()
    start = time.monotonic()
    pump_upstream(fwd, lambda: not fwd.queries)
    assert client.recv(100) == message(9, answers=1)
    assert time.monotonic() - start >= dns.UPSTREAM_GRACE * 0.9


def test_without_upstream_the_embedded_answer_is_given_as_is():
    fwd, client = forwarder_and_client()
    payload = ask(fwd, client, message(10))
    fwd.give_answer(payload[:dns.TAG.size] + message(10, rcode=3))
    assert client.recv(100) == message(10, rcode=3)
