"""The container side's processes around the VM (container/processes.py), against the
real kernel: QEMU's copy of the kernel paged out of another process, virtiofsd's and
QEMU's ends told apart, virtiofsd's descriptors counted against its limit."""
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dkvm.container.processes import file_mappings, page_out
from waiting import poll, wait_until


def test_a_files_mappings_are_found_by_device_and_inode(tmp_path):
    path = tmp_path / "kernel"
    path.write_bytes(b"\x7fELF" + bytes(3 * mmap.PAGESIZE))
    other = tmp_path / "other"
    other.write_bytes(bytes(mmap.PAGESIZE))
    with open(path, "rb") as f, open(other, "rb") as g:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        unrelated = mmap.mmap(g.fileno(), 0, prot=mmap.PROT_READ)
        with open("/proc/self/maps") as maps:
            text = maps.read()
        info = os.stat(path)
        ranges = file_mappings(text, info.st_dev, info.st_ino)
        assert [length for _, length in ranges] == [4 * mmap.PAGESIZE]
        mapped.close()
        unrelated.close()


CHILD = """
import mmap, sys, time
with open(sys.argv[1], "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE))        # every page resident
print("ready", flush=True)
time.sleep(60)
"""


def mapping_rss_kib(pid, path):
    """The RSS of a process's mappings of `path`, from its smaps."""
    total, counting = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split()[0] and len(line.split()) >= 5:
                counting = line.rstrip().endswith(str(path))
            elif counting and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(os.geteuid() != 0, reason="process_madvise needs CAP_SYS_NICE")
def test_another_processs_mapping_of_a_file_is_paged_out(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(os.urandom(4 << 20))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert mapping_rss_kib(child.pid, path) >= 4096
        info = os.stat(path)
        with open(f"/proc/{child.pid}/maps") as f:
            page_out(child.pid, file_mappings(f.read(), info.st_dev, info.st_ino))
        assert poll(lambda: mapping_rss_kib(child.pid, path), lambda kib: kib == 0, 10,
                    interval=0.05) == 0
    finally:
        child.kill()
        child.wait()


def test_virtiofsd_may_have_as_many_descriptors_as_the_container():
    """One per inode the guest holds: its soft limit is raised to the hard one (no
    capability needed; above it would need CAP_SYS_RESOURCE)."""
    import resource
    from dkvm.container.processes import most_descriptors
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert most_descriptors() == (1 << 20 if hard == resource.RLIM_INFINITY else hard)


def stand_in_vm(tmp_path, virtiofsd_script, qemu_script):
    from dkvm.container.processes import Child, VmProcesses
    vm = VmProcesses()
    for name, script in (("virtiofsd", virtiofsd_script), ("qemu", qemu_script)):
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(["sh", "-c", script], stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT)
        setattr(vm, name, Child("QEMU" if name == "qemu" else name, proc, str(log)))
    return vm


def test_virtiofsd_leaving_as_qemu_exits_is_qemus_story(tmp_path):
    """A guest panic: QEMU closes virtiofsd's socket on its way out, virtiofsd is gone
    first, QEMU a moment later. The error is QEMU's end, not virtiofsd's."""
    from dkvm.errors import DkvmError
    vm = stand_in_vm(tmp_path, "echo 'Unexpected poll revents 11'; exit 0", "sleep 0.3")
    vm.virtiofsd.proc.wait(timeout=10)
    assert vm.check(helpers_only=True) is None      # the supervisor then sees QEMU's end
    assert vm.ended()
    vm = stand_in_vm(tmp_path, "exit 0", "sleep 0.3; exit 1")
    vm.virtiofsd.proc.wait(timeout=10)
    with pytest.raises(DkvmError, match=r"^QEMU exited unexpectedly \(QEMU exit status 1"):
        vm.check()


def test_virtiofsd_dying_under_a_running_qemu_is_virtiofsds(tmp_path):
    from dkvm.errors import DkvmError
    vm = stand_in_vm(tmp_path, "kill -9 $$", "sleep 30")
    vm.virtiofsd.proc.wait(timeout=10)
    try:
        with pytest.raises(DkvmError, match=r"^virtiofsd exited unexpectedly \(virtiofsd "
                                            r"killed by signal 9"):
            vm.check(helpers_only=True)
    finally:
        vm.qemu.proc.kill()
        vm.qemu.proc.wait()


def test_virtiofsd_killed_at_boot_is_virtiofsds_though_qemu_then_fails(tmp_path):
    """virtiofsd killed before QEMU connects: QEMU fails at once on the refused socket,
    but what died first, and why, is virtiofsd."""
    from dkvm.errors import DkvmError
    vm = stand_in_vm(tmp_path, "kill -9 $$", "sleep 0.2; echo 'Connection refused' >&2; exit 1")
    vm.virtiofsd.proc.wait(timeout=10)
    vm.qemu.proc.wait(timeout=10)
    with pytest.raises(DkvmError, match=r"^virtiofsd exited unexpectedly \(virtiofsd "
                                        r"killed by signal 9"):
        vm.check()


def test_virtiofsds_descriptors_are_counted_against_its_limit(tmp_path, monkeypatch):
    """What the supervisor watches (supervisor.check_descriptors): the descriptors a
    stand-in virtiofsd holds open, and the most it may; (0, 0) once it is gone."""
    import dkvm.container.processes as processes
    script = "exec 3</dev/null 4</dev/null 5</dev/null; echo ready; sleep 30"
    vm = stand_in_vm(tmp_path, script, "sleep 30")
    try:
        wait_until(lambda: b"ready" in Path(vm.virtiofsd.log).read_bytes(),
                   "the stand-in to open its descriptors", timeout=10, interval=0.05)
        monkeypatch.setattr(processes, "most_descriptors", lambda: 16)  # the table: 64 > 8
        used, most = vm.virtiofsd_descriptors()
        assert most == 16 and 6 <= used < 16                 # 0-2, 3-5: listed, not guessed
        monkeypatch.setattr(processes, "most_descriptors", lambda: 1 << 20)
        used, most = vm.virtiofsd_descriptors()
        assert most == 1 << 20 and used >= 6                  # the table's size: small
    finally:
        for child in vm.children():
            child.proc.kill()
            child.proc.wait()
    assert vm.virtiofsd_descriptors() == (0, 0)


def test_the_image_kernels_initramfs_leaves_run_once_the_guest_runs(tmp_path, monkeypatch):
    """QEMU read it at start; in the container's /run it is memory in the limit."""
    import dkvm.container.processes as processes
    from dkvm.schema import Boot
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701")
    monkeypatch.setattr(processes.paths, "IMAGE_INITRD", str(initrd))
    vm = stand_in_vm(tmp_path, "sleep 30", "sleep 30")
    try:
        vm.release_kernel_image(Boot(name="image", kernel="/proc/self/fd/9",
                                     initrd=str(initrd)))
        assert not initrd.exists()
    finally:
        for child in vm.children():
            child.proc.kill()
            child.proc.wait()
