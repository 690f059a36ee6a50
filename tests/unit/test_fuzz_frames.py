"""An integration test of every reader of the control channel (wire, the supervisor,
the guest's loop) under the same fuzzed input, so that the three hold one rule.
Random and malformed frames, in bounded time, at the decoder, the container side's
supervisor and the guest's loop: nothing escapes but the documented error. The
supervisor either goes on or ends the container with one line (GuestMisbehaved, a
DkvmError); the guest's loop logs and goes on; the decoder raises ProtocolError and
can be fed again."""
import os
import random
import signal
import socket
import time

import pytest

from dkvm import wire
from dkvm.container.signal_inbox import SignalInbox
from dkvm.container.supervisor import Supervisor
from dkvm.errors import DkvmError
from dkvm.guest import network
from dkvm.roles.ctr_entrypoint import listen
from dkvm.schema import Plan
from harness import FakeVm, GuestHarness

SECONDS = 2.0
SEED = int(os.environ.get("DKVM_FUZZ_SEED", "0")) or random.randrange(1 << 30)


@pytest.fixture
def rng():
    print(f"fuzz seed {SEED} (DKVM_FUZZ_SEED={SEED} repeats it)")
    return random.Random(SEED)


def random_json(rng, depth=0):
    kinds = ["int", "bigint", "str", "bool", "null", "float"] + (["list", "dict"] if depth < 3
                                                                  else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-3, 300)
    if kind == "bigint":
        return rng.choice([-(1 << 70), 1 << 40, 1 << 64])
    if kind == "str":
        return rng.choice(["", "status", "\x1b[2J", "é" * rng.randint(0, 5), "a" * 300])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "float":
        return rng.choice([0.5, float("inf"), -1e300])
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["status", "signal", "message", "rows", "cols", "bytes", "process", "args",
            "winsize", "wait_for", "steps", "kind", "sysctl", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def random_payload(rng):
    choice = rng.random()
    if choice < 0.4:
        from dkvm import lightjson
        try:
            return lightjson.dumps(random_json(rng)).encode()
        except (TypeError, ValueError):
            return b"{}"
    if choice < 0.6:
        return os.urandom(rng.randint(0, 64))
    if choice < 0.8:
        return rng.choice([b"", b"{", b"[" * 5000, b'{"status":0}', b'{"bytes":65536}',
                           b'{"signal":15}', b'{"rows":10,"cols":20}'])
    return b"x" * rng.randint(0, 200000)


def random_frame(rng, channels=(0, 0, 0, 1, 2, 7, 65535)):
    if rng.random() < 0.05:
        return os.urandom(rng.randint(1, 40))           # not even a header
    ftype = rng.randint(0, 20)
    payload = random_payload(rng)
    return wire.HEADER.pack(wire.MAGIC, ftype, rng.choice(channels), len(payload)) + payload


def test_the_decoder_raises_only_protocol_errors_and_recovers(rng):
    decoder = wire.Decoder()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        data = b"".join(random_frame(rng) for _ in range(rng.randint(1, 5)))
        cut = rng.randint(0, len(data))
        for chunk in (data[:cut], data[cut:]):
            try:
                for frame in decoder.feed(chunk):
                    assert 0 < frame.type and len(frame.payload) <= wire.MAX_PAYLOAD
                    if frame.type in wire.PAYLOADS:
                        try:
                            frame.record()
                        except wire.ProtocolError:
                            pass
            except wire.ProtocolError:
                assert decoder.pending == 0
            assert decoder.pending <= wire.HEADER.size + wire.MAX_PAYLOAD


def test_the_supervisor_goes_on_or_ends_the_container_with_one_line(rng, capsys, tmp_path):
    signals = SignalInbox([signal.SIGCHLD])
    deadline = time.monotonic() + SECONDS
    outcomes = {"went on": 0, "ended": 0}
    try:
        while time.monotonic() < deadline:
            control, guest = socket.socketpair()
            listener = listen(str(tmp_path / "exec.sock"))
            inbox, _follower = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            supervisor = Supervisor(control, listener, inbox, FakeVm(), signals, Plan())
            try:
                guest.setblocking(False)
                for _ in range(rng.randint(1, 8)):
                    try:
                        guest.send(random_frame(rng))
                    except BlockingIOError:
                        break
                    supervisor.step(timeout=0)
                    supervisor.step(timeout=0)
                outcomes["went on"] += 1
            except DkvmError as err:
                assert err.message.startswith("the guest broke the control protocol (")
                assert "\n" not in err.message
                outcomes["ended"] += 1
            finally:
                for sock in (control, guest, listener, inbox, _follower):
                    sock.close()
                os.unlink(tmp_path / "exec.sock")
                for sock in supervisor.dns.sockets():
                    sock.close()
    finally:
        signals.close()
    assert outcomes["went on"] and outcomes["ended"], outcomes
    for line in capsys.readouterr().err.splitlines():
        assert line.startswith("dkvm") and line.isprintable()


def test_the_guest_loop_logs_and_goes_on(rng, monkeypatch, capsys):
    """The container side is the guest's own, but its frames are still checked: init
    must never die of one. (Network steps and sysctls are recorded, not applied: this
    is the test host.)"""
    applied = []
    monkeypatch.setattr(network, "run_steps", lambda steps, until_waiting=False:
                        applied.append(steps) or [])
    monkeypatch.setattr(network, "links_by_mac", lambda: {})
    monkeypatch.setattr(network, "NIC_WAIT", 0)
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        harness = GuestHarness()
        try:
            def refuse(process, workload_pid, stdio):
                raise OSError(1, "not in a fuzz test")
            harness.loop.spawn_exec = refuse
            for _ in range(rng.randint(1, 20)):
                frame = random_frame(rng)
                if frame[1:2] == bytes([wire.SIGNAL]):
                    continue                # it would signal the test's stand-in workload
                harness.send_raw(frame)
                harness.loop.step(timeout=0.01)
                assert harness.loop.status is None
        finally:
            harness.close()
