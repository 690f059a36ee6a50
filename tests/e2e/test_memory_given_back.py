"""Memory given back: a guest that fills memory and frees it returns it to the host
(virtio-balloon free page reporting; QEMU punches the reported pages out of the guest's
RAM file), as a runc container does; and every kernel has the drivers for it and for
vmgenid bound."""
import pytest

from fill_free import cgroup_memory_file     # bench/: the benchmark reads it the same way
from dockerutil import KERNELS, docker_run, sh
from waiting import poll, wait_until_steady

FILL_MIB = 512
# the target: back within this much of the idle level, in 10 s (the bound is
# wider for a loaded machine; the level reached is what the test asserts)
BACK_WITHIN_MIB = 64
BACK_TIMEOUT = 30
# what the fill must at least add on the host, or the test would prove nothing
FILL_SEEN_MIB = FILL_MIB - 64
# a tmpfs in the guest holds the fill: /dev/shm, made big enough (runc's and dkvm's way)
SHM = ["--shm-size=600m", "-e", "DKVM_DEV_SHM_SIZE=600m"]


def reader(name):
    pid = sh("docker", "inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
    usage = cgroup_memory_file(pid)

    def mib():
        with open(usage) as f:
            return int(f.read()) >> 20
    return mib


@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_memory_a_workload_frees_leaves_the_containers_cgroup(runtime, busybox_image,
                                                              container_name):
    sh("docker", "run", "-d", f"--runtime={runtime}", "--name", container_name, "-m", "1g",
       *SHM, busybox_image, "sleep", "600")
    sh("docker", "exec", container_name, "true")            # booted
    mib = reader(container_name)
    wait_until_steady(lambda: mib() // 8, "an idle level", settle=2, timeout=60)
    idle = mib()
    sh("docker", "exec", container_name, "dd", "if=/dev/zero", "of=/dev/shm/fill", "bs=1M",
       f"count={FILL_MIB}")
    peak = mib()
    assert peak >= idle + FILL_SEEN_MIB, (idle, peak)
    sh("docker", "exec", container_name, "rm", "/dev/shm/fill")
    after = poll(mib, lambda now: now <= idle + BACK_WITHIN_MIB, BACK_TIMEOUT)
    assert after <= idle + BACK_WITHIN_MIB, (f"{runtime}: idle {idle} MiB, peak {peak}, "
                                             f"{after} after {BACK_TIMEOUT} s")


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_binds_the_balloon_and_vmgenid(kernel, busybox_image):
    """Free page reporting needs the balloon's driver; a restored VM reseeds its RNG
    only if vmgenid's is bound to QEMU's device."""
    run = docker_run("dkvm", "-e", f"DKVM_KERNEL={kernel}", busybox_image, "sh", "-c",
                     "ls /sys/bus/virtio/drivers/virtio_balloon; echo ---; "
                     "ls /sys/bus/acpi/drivers/vmgenid")
    assert run.returncode == 0, run.stderr
    balloon, vmgenid = run.stdout.split("---\n")
    assert any(name.startswith("virtio") for name in balloon.split()), run.stdout
    assert "QEMUVGID:00" in vmgenid.split(), run.stdout
