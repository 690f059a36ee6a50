"""container.port_forward: the pod's localhost redirected to the sandbox's listener and
each connection relayed as an exec channel. In a network namespace of its own,
against the real kernel's nftables; the test's thread plays the supervisor and the
guest on the exec socket."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from unitutil import REPO

IN_NAMESPACE = r"""
import json, os, socket, subprocess, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
from dkvm import wire
from dkvm.container.port_forward import PortForwarding
from dkvm.schema import ExecStart

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
exec_socket = os.path.join(tempfile.mkdtemp(), "exec.sock")
multiplexer = socket.socket(socket.AF_UNIX)
multiplexer.bind(exec_socket)
multiplexer.listen(8)
starts = []

def play_the_guest():
    # an echo server on 4321; nothing listens on 4322 (the guest refuses: 126)
    while True:
        relay, _ = multiplexer.accept()
        decoder, first = wire.Decoder(), None
        while True:
            data = relay.recv(1 << 16)
            if not data:
                break
            for frame in decoder.feed(data):
                if frame.type == wire.EXEC_START:
                    first = frame.record()
                    starts.append(first.port)
                    if first.port != 4321:
                        relay.sendall(wire.encode(wire.STDERR, b"nothing listens\n") +
                                      wire.encode(wire.EXEC_EXIT, {"status": 126}))
                elif frame.type == wire.STDIN and frame.payload:
                    relay.sendall(wire.encode(wire.WINDOW, {"bytes": len(frame.payload)}) +
                                  wire.encode(wire.STDOUT, frame.payload))
                elif frame.type == wire.STDIN:
                    relay.sendall(wire.encode(wire.EXEC_EXIT, {"status": 0}))
        relay.close()

threading.Thread(target=play_the_guest, daemon=True).start()
forwarding = PortForwarding(exec_socket)
forwarding.start()

def dial(port, address="127.0.0.1"):
    for _ in range(100):            # the redirect is made in the forwarder's thread
        try:
            return socket.create_connection((address, port), timeout=60)
        except ConnectionRefusedError:
            threading.Event().wait(0.05)
    raise AssertionError("never redirected")

result = {}
client = dial(4321)
payload = os.urandom(1 << 20)
threading.Thread(target=lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)),
                 daemon=True).start()
echoed = b""
while data := client.recv(1 << 16):
    echoed += data
result["echoed"] = echoed == payload
client = dial(4322)
try:
    result["refused"] = client.recv(10)
except ConnectionResetError:
    result["refused"] = "reset"
try:
    socket.create_connection(("127.0.0.2", 4321), timeout=60)
    result["other_address"] = "connected"
except ConnectionRefusedError:
    result["other_address"] = "refused"
result["starts"] = starts
rules = subprocess.run(["nft", "list", "table", "ip", "dkvm"], capture_output=True, text=True)
result["rule"] = [line.strip() for line in rules.stdout.splitlines() if "redirect" in line]
result["listener"] = forwarding.listener.getsockname()[1]
print(json.dumps(result))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nft"),
                    reason="needs root, unshare and nft")
def test_the_pods_localhost_reaches_the_guest_through_an_exec_channel_per_connection():
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", IN_NAMESPACE, str(REPO)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # a megabyte each way, past the window, ended by the client's half close
    assert result["echoed"] is True
    # the port each connection was dialled to, not the listener's
    assert result["starts"] == [4321, 4322]
    # where the guest has no listener, the client's connection is reset, as a refusal
    assert result["refused"] == "reset"
    assert "nothing listens" in out.stderr
    # only 127.0.0.1: the rest of the loopback is left alone
    assert result["other_address"] == "refused"
    assert result["rule"] == [f"ip protocol tcp ip daddr 127.0.0.1 redirect to :{result['listener']}"]
