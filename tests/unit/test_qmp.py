"""The QMP client (boot/qmp.py): capabilities negotiated first, QEMU's refusals as one
line, events that arrive before an answer kept for whoever waits on them."""
import json
import socket
import threading

import pytest

from dkvm.boot.qmp import Qmp
from dkvm.errors import DkvmError


class FakeQemuMonitor:
    """A QMP server on a unix socket, answering from a script: {command: reply}, where
    a reply is a list of messages (events first, then the answer)."""

    def __init__(self, path, script):
        self.requests = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self.serve, args=(script,), daemon=True)
        self.thread.start()

    def serve(self, script):
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rw") as f:
            f.write(json.dumps({"QMP": {"version": {}, "capabilities": []}}) + "\n")
            f.flush()
            for line in f:
                request = json.loads(line)
                self.requests.append(request)
                for message in script.get(request["execute"], [{"return": {}}]):
                    f.write(json.dumps(message) + "\n")
                f.flush()


def deleted(device):
    return {"event": "DEVICE_DELETED", "data": {"device": device, "path": "/x"}}


def test_qmp_negotiates_then_runs_commands(tmp_path):
    path = str(tmp_path / "qmp.sock")
    monitor = FakeQemuMonitor(path, {"query-status": [{"return": {"status": "running"}}]})
    qmp = Qmp(path)
    assert qmp.execute("query-status") == {"status": "running"}
    qmp.execute("device_add", driver="virtio-net-pci", id="nic1")
    assert monitor.requests == [
        {"execute": "qmp_capabilities"}, {"execute": "query-status"},
        {"execute": "device_add", "arguments": {"driver": "virtio-net-pci", "id": "nic1"}}]
    qmp.close()


def test_qmp_error_names_the_command_and_qemus_reason(tmp_path):
    path = str(tmp_path / "qmp.sock")
    FakeQemuMonitor(path, {"device_add": [{"error": {"class": "GenericError",
                                                     "desc": "Duplicate ID 'nic1'"}}]})
    with pytest.raises(DkvmError, match="QEMU refused device_add: Duplicate ID 'nic1'"):
        Qmp(path).execute("device_add", id="nic1")


def test_qmp_keeps_events_that_come_before_an_answer(tmp_path):
    path = str(tmp_path / "qmp.sock")
    FakeQemuMonitor(path, {"device_del": [deleted("nic0"), {"return": {}}, deleted("nic2")]})
    qmp = Qmp(path)
    qmp.execute("device_del", id="nic2")
    assert qmp.wait_event("DEVICE_DELETED", lambda d: d["device"] == "nic2", 5)["data"][
        "device"] == "nic2"
    assert qmp.wait_event("DEVICE_DELETED", lambda d: d["device"] == "nic0", 5)
    assert qmp.wait_event("DEVICE_DELETED", lambda d: True, 0.2) is None


def test_qmp_socket_missing_is_a_clear_error(tmp_path):
    with pytest.raises(DkvmError, match="cannot reach QEMU's monitor"):
        Qmp(str(tmp_path / "absent.sock"), timeout=0.3)
