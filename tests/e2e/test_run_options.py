"""DKVM_* options and bad input: one clear line, non-zero exit, nothing left behind."""
import os

import pytest

from dockerutil import DKVM_LINE, dkvm_lines, docker_run, sh

BAD_INPUT = {
    "accel": (["-e", "DKVM_ACCEL=foo"], ["DKVM_ACCEL", "auto, kvm, tcg"]),
    "kernel": (["-e", "DKVM_KERNEL=nope"], ["DKVM_KERNEL", "available: debian"]),
    "memory": (["-m", "64m"], ["memory limit", "at least"]),
    "unknown-option": (["-e", "DKVM_NOPE=1"], ["DKVM_NOPE", "DKVM_ACCEL"]),
    "bool": (["-e", "DKVM_KERNEL_DEBUG=maybe"], ["DKVM_KERNEL_DEBUG", "1 or 0"]),
    "seconds": (["-e", "DKVM_BOOT_TIMEOUT=soon"], ["DKVM_BOOT_TIMEOUT", "seconds"]),
}


def qemu_processes():
    out = sh("pgrep", "-f", "qemu-system-x86_64", check=False)
    return out.stdout.split()


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_fails_at_once_and_leaves_nothing(busybox_image, container_name, case):
    flags, words = BAD_INPUT[case]
    before = qemu_processes()
    out = sh("docker", "run", "--runtime=dkvm", "--name", container_name, *flags, busybox_image,
             "true", check=False, timeout=60)
    assert out.returncode == 125
    lines = dkvm_lines(out.stderr)
    assert len(lines) == 1, out.stderr
    assert len(DKVM_LINE.findall(lines[0])) == 1       # one prefix, never two
    for word in words:
        assert word in lines[0]
    state = sh("docker", "inspect", "-f", "{{.State.Status}}", container_name).stdout.strip()
    assert state == "created"   # as runc leaves a container whose create failed
    assert qemu_processes() == before


def test_a_boot_slower_than_the_boot_timeout_fails_with_one_line(busybox_image):
    """Booting cold under TCG, the kernel alone takes over a second (a VM restored from
    its template starts the workload within one)."""
    out = docker_run("dkvm", "-e", "DKVM_ACCEL=tcg", "-e", "DKVM_BOOT_TIMEOUT=1",
                     "-e", "DKVM_TEMPLATE=0", busybox_image, "echo", "never")
    assert out.returncode != 0 and out.stdout == ""
    (line,) = dkvm_lines(out.stderr)
    assert "the VM did not start the workload within 1s (DKVM_BOOT_TIMEOUT; " in line


def test_accel_tcg_forced(busybox_image):
    out = docker_run("dkvm", "-e", "DKVM_ACCEL=tcg", busybox_image, "true")
    assert (out.returncode, out.stderr) == (0, "")


@pytest.mark.skipif(not os.path.isdir("/sys/module/kvm_pvm"), reason="host has no PVM")
def test_accel_kvm_refused_under_pvm(busybox_image):
    out = docker_run("dkvm", "-e", "DKVM_ACCEL=kvm", busybox_image, "true")
    assert out.returncode == 125
    assert "DKVM_ACCEL=kvm" in out.stderr and "not usable" in out.stderr


def test_options_do_not_leak_into_the_workload(busybox_image):
    out = docker_run("dkvm", "-e", "DKVM_ACCEL=tcg", "-e", "DKVM_KERNEL=debian", busybox_image,
                     "env")
    assert out.returncode == 0, out.stderr
    assert "DKVM" not in out.stdout


def test_kernel_debug_shows_boot_log_on_stderr_only(busybox_image):
    out = docker_run("dkvm", "-e", "DKVM_KERNEL_DEBUG=1", busybox_image, "echo", "hi")
    assert out.stdout == "hi\n"
    assert "Linux version" in out.stderr


def test_kernel_modules_mounted_on_request(busybox_image):
    """With DKVM_KERNEL_MOUNT_LIB_MODULES=1 the workload loads the guest kernel's
    modules by name (macvlan, a module in every kernel DKVM carries), read-only, and
    overlay mounts (built in, or loaded on the kernel's own request). Without it, the
    VM has no /lib/modules, as runc's container has none."""
    script = ("modprobe macvlan && grep -o '^macvlan' /proc/modules && mkdir -p /o && "
              "mount -t tmpfs t /o && mkdir /o/l /o/u /o/w /o/m && "
              "mount -t overlay x -o lowerdir=/o/l,upperdir=/o/u,workdir=/o/w /o/m && "
              "grep -c ' /o/m overlay' /proc/mounts && "
              "(touch /lib/modules/x 2>/dev/null || echo read-only)")
    out = docker_run("dkvm", "-e", "DKVM_KERNEL_MOUNT_LIB_MODULES=1", busybox_image,
                     "sh", "-c", script)
    assert (out.returncode, out.stdout) == (0, "macvlan\n1\nread-only\n"), out.stderr
    probe = [busybox_image, "sh", "-c", "ls /lib/modules >/dev/null 2>&1; echo $?"]
    assert docker_run("dkvm", *probe).stdout == docker_run("runc", *probe).stdout == "1\n"


def test_kernel_append(busybox_image, operator_allows):
    operator_allows("DKVM_KERNEL_APPEND")
    out = docker_run("dkvm", "-e", "DKVM_KERNEL_APPEND=dkvm.test=42 -tsc", busybox_image,
                     "cat", "/proc/cmdline")
    cmdline = out.stdout.split()
    assert "dkvm.test=42" in cmdline and "no_timer_check" in cmdline, out.stdout + out.stderr
    assert not [word for word in cmdline if word.startswith("tsc")], out.stdout
    out = docker_run("dkvm", "-e", "DKVM_KERNEL_APPEND=-tsc=unstable", busybox_image, "true")
    assert out.returncode == 125
    assert "DKVM_KERNEL_APPEND: -tsc=unstable removes none of DKVM's kernel arguments" \
        in out.stderr, out.stderr


def test_dev_shm_size(busybox_image):
    out = docker_run("dkvm", "-e", "DKVM_DEV_SHM_SIZE=32m", busybox_image, "sh", "-c",
                     "df -k /dev/shm | tail -1")
    assert out.stdout.split()[1] == str(32 * 1024), out.stdout + out.stderr
