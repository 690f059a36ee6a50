"""container.member_exports: a member's export served by a virtiofsd of the sandbox's
and plugged into the pod's VM over QMP (getfd with the socket, chardev-add on it,
device_add as the container's own export), each step undone if the next fails,
unplugged in order; from a thread of its own, with its outcome on `inbox` and the
monitor given back after each change; the member's mount namespace held meanwhile."""
import os
import socket
import subprocess
import sys
import threading

import pytest

from harness import WAIT
from dkvm.container import member_exports
from dkvm.container.member_exports import MemberExports, plug, unplug
from dkvm.errors import DkvmError
from waiting import wait_until


class FakeQmp:
    """QEMU's monitor as the plug sees it: each command recorded; those in `refuse`
    fail as QEMU's do; a getfd's descriptor is written to (it is the export's)."""

    def __init__(self, refuse=(), released=True):
        self.refuse, self.released, self.commands = refuse, released, []
        self.closed = False

    def execute(self, command, fd=None, **arguments):
        self.commands.append((command, arguments))
        if fd is not None:
            os.write(fd, b"vhost-user")
        if command in self.refuse:
            raise DkvmError(f"QEMU refused {command}: no free PCI slot")
        return {}

    def wait_event(self, name, matches, timeout):
        device = self.commands[-1][1].get("id")
        if self.released and name == "DEVICE_DELETED" and matches({"device": device}):
            return {"event": name, "data": {"device": device}}
        return None

    def close(self):
        self.closed = True


PLUGGED = [
    ("getfd", {"fdname": "m3"}),
    ("chardev-add", {"id": "m3-vfs", "backend": {
        "type": "socket", "data": {"addr": {"type": "fd", "data": {"str": "m3"}},
                                   "server": False}}}),
    ("device_add", {"driver": "vhost-user-fs-pci", "chardev": "m3-vfs", "tag": "m3",
                    "queue-size": 1024, "id": "m3-fs"}),
]


def test_a_members_export_is_plugged_as_the_containers_own_is():
    qmp = FakeQmp()
    export, far = socket.socketpair()
    plug(qmp, export.fileno(), "m3")
    assert qmp.commands == PLUGGED
    assert far.recv(64) == b"vhost-user"            # the descriptor QEMU got is the export's
    export.close()
    far.close()


@pytest.mark.parametrize("refused,undo", [
    ("chardev-add", [("closefd", {"fdname": "m3"})]),
    ("device_add", [("chardev-remove", {"id": "m3-vfs"})]),
])
def test_a_refused_step_undoes_the_ones_before(refused, undo):
    qmp = FakeQmp(refuse={refused})
    export, far = socket.socketpair()
    with pytest.raises(DkvmError, match=f"QEMU refused {refused}"):
        plug(qmp, export.fileno(), "m3")
    done = [name for name, _ in PLUGGED].index(refused) + 1
    assert qmp.commands == PLUGGED[:done] + undo
    export.close()
    far.close()


class SilentQmp(FakeQmp):
    """QEMU that does not answer device_add in time."""

    def execute(self, command, fd=None, **arguments):
        result = super().execute(command, fd=fd, **arguments)
        if command == "device_add":
            raise TimeoutError("timed out")
        return result


def test_an_unanswered_device_add_keeps_the_members_virtiofsd(tmp_path):
    """The device may be in the VM after all: its virtiofsd must not die under it (the
    guest's virtiofs would wedge), so nothing is undone."""
    qmp = SilentQmp()
    export, far = socket.socketpair()
    with pytest.raises(member_exports.DeviceUnknown, match="did not answer device_add"):
        plug(qmp, export.fileno(), "m3")
    assert qmp.commands == PLUGGED
    export.close()
    far.close()

    class Monitor:
        def connect(self):
            return SilentQmp()
    serve = FakeServe()
    exports = MemberExports(Monitor(), serve)
    try:
        exports.plug(9, "m3", member_export(tmp_path))
        outcomes = []
        wait_until(lambda: outcomes.extend(exports.outcomes()) or outcomes, "the outcome",
                   WAIT, 0.01)
    finally:
        exports.close()
    assert "QEMU did not answer device_add" in outcomes[0][2]
    assert len(exports.stuck) == 1 and not serve.served[0][2].killed
    serve.served[0][3].close()


def test_unplug_removes_the_device_then_its_chardev(capsys):
    qmp = FakeQmp()
    unplug(qmp, "m3")
    assert qmp.commands == [("device_del", {"id": "m3-fs"}), ("chardev-remove", {"id": "m3-vfs"})]
    qmp = FakeQmp(released=False)
    unplug(qmp, "m3", wait=0)
    assert "the guest did not release m3-fs within 0s" in capsys.readouterr().err


class FakeMonitor:
    def __init__(self, refuse=()):
        self.clients = []
        self.refuse = refuse

    def connect(self):
        self.clients.append(FakeQmp(self.refuse))
        return self.clients[-1]


class FakeVirtiofsd:
    """virtiofsd as the worker sees it: ends when told (its socket's EOF), or killed."""
    pid = 0             # no process: no descriptors to count

    def __init__(self):
        self.ended = threading.Event()
        self.killed = False

    def wait(self, timeout=None):
        if not self.ended.wait(timeout):
            raise subprocess.TimeoutExpired("virtiofsd", timeout)
        return 0

    def kill(self):
        self.killed = True
        self.ended.set()


class FakeServe:
    """start_virtiofsd's stand-in: the directory it was given, its virtiofsd, and the
    far end of the socket it hands QEMU."""

    def __init__(self):
        self.served = []

    def __call__(self, directory, tag, sys_admin):
        ours, far = socket.socketpair()
        proc = FakeVirtiofsd()
        self.served.append((os.readlink(f"/proc/self/fd/{directory}"), tag, proc, far))
        return proc, ours


def member_export(path):
    return [os.open(path, os.O_PATH | os.O_DIRECTORY),
            os.open("/proc/self/ns/mnt", os.O_RDONLY)]


def test_a_member_is_served_by_our_virtiofsd_plugged_then_unplugged(tmp_path):
    """The plug serves the member's directory, hands QEMU the connected socket and
    holds the member's mount namespace; the unplug gives the monitor back, lets
    virtiofsd end and lets go of the namespace."""
    monitor, serve = FakeMonitor(), FakeServe()
    exports = MemberExports(monitor, serve)
    export = member_export(tmp_path)
    try:
        exports.plug(9, "m3", export)
        outcomes = []
        wait_until(lambda: outcomes.extend(exports.outcomes()) or outcomes, "the outcome",
                   WAIT, 0.01)
        assert outcomes == [(9, "m3", "")]
        [(served, tag, proc, far)] = serve.served
        assert (served, tag) == (str(tmp_path), "m3")
        far.settimeout(WAIT)
        assert far.recv(64) == b"vhost-user"            # QEMU got virtiofsd's socket
        assert [name for name, _ in monitor.clients[0].commands] == \
            [name for name, _ in PLUGGED]
        with pytest.raises(OSError):
            os.fstat(export[0])                         # virtiofsd has its own
        os.fstat(export[1])                             # the member's mounts live on
        proc.ended.set()                                # its socket's EOF, at chardev-remove
        exports.unplug("m3")
        wait_until(lambda: not exports.served, "the unplug", WAIT, 0.01)
        wait_until(lambda: monitor.clients[1].closed, "the monitor back", WAIT, 0.01)
    finally:
        exports.close()
    assert [name for name, _ in monitor.clients[1].commands] == ["device_del", "chardev-remove"]
    with pytest.raises(OSError):
        os.fstat(export[1])
    assert not proc.killed
    far.close()


def test_a_refused_plug_says_why_and_leaves_nothing_running(tmp_path):
    monitor, serve = FakeMonitor(refuse={"device_add"}), FakeServe()
    exports = MemberExports(monitor, serve)
    export = member_export(tmp_path)
    try:
        exports.plug(9, "m3", export)
        outcomes = []
        wait_until(lambda: outcomes.extend(exports.outcomes()) or outcomes, "the outcome",
                   WAIT, 0.01)
    finally:
        exports.close()
    assert outcomes == [(9, "m3", "QEMU refused device_add: no free PCI slot")]
    assert serve.served[0][2].killed and not exports.served
    for fd in export:
        with pytest.raises(OSError):
            os.fstat(fd)
    serve.served[0][3].close()


def test_an_export_the_guest_keeps_keeps_its_virtiofsd(tmp_path, capsys):
    """An unplug that fails (the guest never released the device): killing virtiofsd
    under a guest that uses it would wedge the VM's virtiofs; it serves on."""
    monitor, serve = FakeMonitor(), FakeServe()
    exports = MemberExports(monitor, serve)
    try:
        exports.plug(9, "m3", member_export(tmp_path))
        wait_until(exports.outcomes, "the outcome", WAIT, 0.01)
        monitor.refuse = {"chardev-remove"}
        exports.unplug("m3")
        wait_until(lambda: exports.stuck, "the failed unplug", WAIT, 0.01)
    finally:
        exports.close()
    assert not serve.served[0][2].killed
    assert "cannot unplug a pod member's export (m3) from the VM" in capsys.readouterr().err
    serve.served[0][3].close()


def test_virtiofsd_serves_the_members_directory_on_a_socket_we_connect_to(tmp_path,
                                                                          monkeypatch):
    """start_virtiofsd: the directory passed as a descriptor (virtiofsd's source is
    /proc/self/fd/N/.: the member's mounts as the member sees them), the listener
    passed, the socket's name gone once connected."""
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "rootfs").mkdir()
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(member_exports.paths, "RUN_DIR", str(tmp_path / "run"))
    script = ("import os, socket, sys; listener = socket.socket(fileno=int(sys.argv[1])); "
              "conn = listener.accept()[0]; "
              "conn.sendall(' '.join(os.listdir(sys.argv[2])).encode())")
    monkeypatch.setattr(member_exports, "virtiofsd_argv",
                        lambda fd, sys_admin, nofile, source, coherent: [
                            sys.executable, "-c", script, str(fd), source])
    directory = os.open(tmp_path / "share", os.O_PATH | os.O_DIRECTORY)
    proc, connected = member_exports.start_virtiofsd(directory, "m3")
    try:
        connected.settimeout(WAIT)
        assert connected.recv(64) == b"rootfs"
        assert proc.wait(WAIT) == 0
        assert os.listdir(tmp_path / "run") == ["virtiofsd-m3.log"]
    finally:
        connected.close()
        os.close(directory)


def test_tags_are_m_and_a_number():
    assert member_exports.member_tag(0) == "m0"


def test_only_a_sandbox_has_member_exports():
    from dkvm.schema import Options, Plan
    assert member_exports.sandbox_exports(Plan(pod="member"), None) is None
    assert member_exports.sandbox_exports(Plan(), None) is None
    exports = member_exports.sandbox_exports(
        Plan(pod="sandbox", options=Options(sys_admin=True)), FakeMonitor())
    assert exports.sys_admin and exports.serve is member_exports.start_virtiofsd
    exports.close()


def test_the_most_descriptors_a_members_virtiofsd_holds_are_counted(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys; fds = [os.open(sys.argv[1], os.O_RDONLY) for _ in range(300)]; "
        "print('ready', flush=True); sys.stdin.read()"), str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        exports = MemberExports(monitor=None)
        assert exports.most_descriptors_open() == 0
        exports.served["m0"] = (holder, None)
        assert 300 <= exports.most_descriptors_open() < 20000
    finally:
        holder.stdin.close()
        holder.wait(WAIT)
