"""Following Docker's network changes: the QMP client, the change diffs, and the
guest's queue of changes waiting for their NICs."""
import json
import os
import socket
import threading

import pytest

from dkvm import net_guest, net_hotplug
from dkvm.errors import DkvmError
from dkvm.qemu import command_line_options, nic_options
from dkvm.qmp import Qmp


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
        Qmp(str(tmp_path / "absent.sock"))


def test_hot_plugged_nic_options_match_the_boot_command_line():
    netdev, device = nic_options(3, "02:42:0a:00:00:05")
    assert netdev == {"type": "tap", "id": "net3", "ifname": "dkvm-tap3", "script": "no",
                      "downscript": "no"}
    assert device["id"] == "nic3" and device["netdev"] == "net3"
    assert command_line_options(device, "driver") == (
        "virtio-net-pci,netdev=net3,id=nic3,mac=02:42:0a:00:00:05,romfile=")


def test_route_changes_move_the_default_gateway():
    old_default = {"dst_len": 0, "gateway": "172.17.0.1", "index": 5, "dev": "eth0"}
    new_default = {"dst_len": 0, "gateway": "172.18.0.1", "index": 9, "dev": "eth1"}
    static = {"dst_len": 16, "dst": "10.1.0.0", "gateway": "", "index": 5, "dev": "eth0"}
    assert net_hotplug.route_changes([old_default, static], [static, new_default]) == (
        [old_default], [new_default])
    assert net_hotplug.route_changes([static], [static]) == ([], [])


def test_file_stamps_see_a_rewrite_in_place(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    before = net_hotplug.file_stamps([str(hosts), str(tmp_path / "absent")])
    with open(hosts, "a") as f:             # Docker rewrites the bind-mounted file in place
        f.write("10.0.0.2 me\n")
    os.utime(hosts, ns=(1, 1))
    assert net_hotplug.file_stamps([str(hosts), str(tmp_path / "absent")]) != before
    assert before[1] is None


def change(*macs):
    return {"sysctl": {}, "add": [{"mac": mac, "name": "eth9"} for mac in macs],
            "routes_del": [], "routes_add": [], "files_changed": False}


def test_pending_changes_wait_in_order_for_their_nics(monkeypatch):
    present, applied = set(), []
    monkeypatch.setattr(net_guest, "links_by_mac", lambda: {mac: 1 for mac in present})
    monkeypatch.setattr(net_guest, "apply_change", applied.append)
    pending = net_guest.PendingChanges()
    assert pending.timeout(1.0) == 1.0
    first, second = change("02:00:00:00:00:01"), change()
    pending.add(first)
    pending.add(second)                     # needs no NIC, but comes after the first
    assert pending.apply_ready() == [] and applied == []
    assert pending.timeout(1.0) == pending.POLL
    present.add("02:00:00:00:00:01")
    assert pending.apply_ready() == [] and applied == [first, second]
    assert pending.timeout(1.0) == 1.0


def test_a_nic_that_never_shows_up_is_reported_and_skipped(monkeypatch):
    applied = []
    monkeypatch.setattr(net_guest, "links_by_mac", lambda: {})
    monkeypatch.setattr(net_guest, "apply_change", applied.append)
    monkeypatch.setattr(net_guest, "NIC_WAIT", 0)
    pending = net_guest.PendingChanges()
    pending.add(change("02:00:00:00:00:07"))
    pending.add(change())
    errors = pending.apply_ready()
    assert len(errors) == 1 and "02:00:00:00:00:07" in errors[0] and "within 0s" in errors[0]
    assert applied == [change()]
