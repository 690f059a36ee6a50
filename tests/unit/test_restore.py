"""container.restore: a template's files checked and copied for one VM, and the
restore driven over QMP."""
import hashlib
import os

import pytest

from dkvm import lightjson, paths
from dkvm.container import restore
from dkvm.boot.sparse import data_extents
from dkvm.container.restore import copy_data, open_ram, open_template, plug_devices, sized_memfd
from dkvm.errors import DkvmError
from dkvm.schema import Options, Plan
from unitutil import sparse_file

MIB = 1 << 20


def test_only_the_data_of_the_templates_ram_is_copied_its_holes_stay_holes(tmp_path):
    size = 64 * MIB
    ram = sparse_file(tmp_path / "ram", size, [(0, b"a" * 8192), (40 * MIB, b"b" * 4096)])
    source, fd = open_ram(str(ram), size), sized_memfd(size)
    try:
        copy_data(source, fd, size)
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, 8192, 0) == b"a" * 8192
        assert os.pread(fd, 4096, 40 * MIB) == b"b" * 4096
        assert os.pread(fd, 4096, 20 * MIB) == b"\0" * 4096
        assert os.fstat(fd).st_blocks * 512 < 4 * MIB    # not 64 MiB of zeros
    finally:
        os.close(fd)
        os.close(source)
    with os.fdopen(os.open(ram, os.O_RDONLY)) as f:
        assert list(data_extents(f.fileno(), size))[0][0] == 0


def test_a_ram_file_of_another_size_or_not_a_file_is_refused(tmp_path):
    ram = sparse_file(tmp_path / "ram", 4 * MIB, [])
    with pytest.raises(ValueError):
        open_ram(str(ram), 8 * MIB)
    os.symlink(ram, tmp_path / "link")
    with pytest.raises(OSError):
        open_ram(str(tmp_path / "link"), 4 * MIB)


def payload_with_template(tmp_path, state=b"device state", **manifest):
    directory = tmp_path / paths.TEMPLATES_DIR / "t"
    directory.mkdir(parents=True)
    sparse_file(directory / restore.RAM, 64 * MIB, [(0, b"x" * 4096)])
    (directory / restore.STATE).write_bytes(state)
    fields = {"vcpus": 2, "memory_mib": 64, "accel": "tcg",
              "state_sha256": hashlib.sha256(b"device state").hexdigest()}
    (directory / restore.MANIFEST).write_text(lightjson.dumps({**fields, **manifest}))
    return str(tmp_path)


def plan(**fields):
    return Plan(template="t", memory_mib=64, options=Options(accel="tcg"), **fields)


def test_a_fitting_template_gives_the_vms_ram_and_the_checked_state(tmp_path):
    files = open_template(plan(), 2, root=payload_with_template(tmp_path))
    try:
        assert os.pread(files.ram_fd, 4096, 0) == b"\0" * 4096     # filled as QEMU starts
        files.fill_ram()
        assert os.pread(files.ram_fd, 4096, 0) == b"x" * 4096
        assert os.read(files.state_fd, 100) == b"device state"
    finally:
        files.close()


@pytest.mark.parametrize("vcpus, manifest, state", [
    (1, {}, b"device state"),                           # another machine: boots cold
    (2, {"memory_mib": 128}, b"device state"),
    (2, {"accel": "kvm"}, b"device state"),
    (2, {}, b"device statf"),                           # not the state it was saved with
])
def test_a_template_that_does_not_fit_or_is_damaged_means_a_cold_boot(tmp_path, vcpus,
                                                                     manifest, state):
    root = payload_with_template(tmp_path, state=state, **manifest)
    assert open_template(plan(), vcpus, root=root) is None


def test_no_template_named_or_none_there_means_a_cold_boot(tmp_path):
    assert open_template(Plan(), 2, root=str(tmp_path)) is None
    assert open_template(plan(), 2, root=str(tmp_path)) is None


class FakeQmp:
    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.calls = []

    def execute(self, command, **arguments):
        self.calls.append((command, arguments))
        if command == "query-migrate":
            return {"status": self.statuses.pop(0) if len(self.statuses) > 1
                    else self.statuses[0]}
        return {}


def test_devices_are_plugged_once_the_state_is_loaded_then_the_vm_runs():
    qmp = FakeQmp(["active", "active", "completed"])
    plug_devices(qmp, [{"driver": "a", "id": "x"}, {"driver": "b", "id": "y"}], lambda: None)
    commands = [command for command, _ in qmp.calls]
    assert commands == ["query-migrate"] * 3 + ["device_add", "device_add", "cont"]
    assert qmp.calls[3][1] == {"driver": "a", "id": "x"}


def test_a_failed_restore_is_one_line():
    with pytest.raises(DkvmError, match="could not restore the VM from its template"):
        plug_devices(FakeQmp(["failed"]), [], lambda: None)


def test_a_template_directory_that_is_a_link_is_not_followed(tmp_path):
    root = payload_with_template(tmp_path / "real")
    (tmp_path / "linked" / paths.TEMPLATES_DIR).mkdir(parents=True)
    os.symlink(os.path.join(root, paths.TEMPLATES_DIR, "t"),
               tmp_path / "linked" / paths.TEMPLATES_DIR / "t")
    open_template(plan(), 2, root=root).close()
    assert open_template(plan(), 2, root=str(tmp_path / "linked")) is None


class EndedVm:
    """A VM whose QEMU died (killed as it restored): check() tells its story."""

    def __init__(self):
        self.waited = 0

    def qemu_ends_within(self, timeout):
        self.waited = timeout
        return True

    def check(self):
        raise DkvmError("QEMU exited unexpectedly (QEMU killed by signal 9)")


def test_a_qemu_killed_while_it_restores_is_its_own_one_line(monkeypatch):
    def broken(path):
        raise ConnectionResetError(104, "Connection reset by peer")
    monkeypatch.setattr(restore, "Qmp", broken)
    vm = EndedVm()
    with pytest.raises(DkvmError, match="QEMU killed by signal 9"):
        restore.resume(plan(), None, vm)
    assert vm.waited > 0


def test_a_monitor_that_breaks_off_while_qemu_runs_is_one_line(monkeypatch):
    def broken(path):
        raise ConnectionResetError(104, "Connection reset by peer")
    monkeypatch.setattr(restore, "Qmp", broken)
    running = EndedVm()
    running.check = lambda: None
    with pytest.raises(DkvmError, match="cannot restore the VM from its template: .*reset"):
        restore.resume(plan(), None, running)
