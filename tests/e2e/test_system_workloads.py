"""What only a VM runs: systemd as PID 1, Docker inside on a DKVM_DISKS disk that
outlives the VM, and a workload that needs the kernel itself (modules, loop devices,
sysctls no container may set). Debian images built here (conftest)."""
import subprocess
import uuid

import pytest

from dockerutil import KERNELS, dkvm_lines, docker_run, sh
from waiting import poll, wait_until

pytestmark = pytest.mark.slow

BOOTED = 300                # systemd and dockerd up in a TCG VM on a busy machine
DISK = "/disks/docker.img,/var/lib/docker,ext4,4g"


def run_system(image, name, volume, kernel):
    """The system image with a disk for /var/lib/docker on `volume`."""
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", name, "-v", f"{volume}:/disks",
       "-e", f"DKVM_DISKS={DISK}", "-e", f"DKVM_KERNEL={kernel}", image)


def system_state(name):
    out = sh("docker", "exec", name, "systemctl", "is-system-running", check=False)
    return out.stdout.strip()


def wait_for_system(name):
    state = poll(lambda: system_state(name), lambda s: s in ("running", "degraded"), BOOTED, 2)
    failed = sh("docker", "exec", name, "systemctl", "--failed", "--no-legend",
                check=False).stdout
    assert state == "running", f"systemd is {state!r}; failed units: {failed}"


def dockerd_answers(name):
    return sh("docker", "exec", name, "docker", "info", "--format", "{{.Driver}}",
              check=False).stdout.strip()


@pytest.fixture
def disk_volume(docker):
    """A named volume for a disk, removed at the end (ask for it before the container
    that uses it: fixtures end in reverse order)."""
    name = f"dkvm-test-disk-{uuid.uuid4().hex[:8]}"
    yield name
    sh("docker", "volume", "rm", "-f", name, check=False)


@pytest.mark.parametrize("kernel", KERNELS)
def test_systemd_and_docker_inside_on_a_disk_that_outlives_the_vm(kernel, system_image,
                                                                  busybox_image, disk_volume,
                                                                  container_name):
    run_system(system_image, container_name, disk_volume, kernel)
    wait_for_system(container_name)
    # a clean cgroup tree of its own: systemd in init.scope, nothing outside it
    assert sh("docker", "exec", container_name, "cat", "/proc/1/cgroup").stdout == \
        "0::/init.scope\n"
    assert sh("docker", "exec", container_name, "cat", "/sys/fs/cgroup/cgroup.procs").stdout \
        == ""
    status = sh("docker", "exec", container_name, "systemctl", "status", "--no-pager",
                check=False)
    assert "Input/output error" not in status.stdout + status.stderr
    journal = sh("docker", "exec", container_name, "journalctl", "-b", "--no-pager", "-n", "3")
    assert journal.stdout.strip()
    # Docker inside: overlay2 on the disk, a container of an image loaded from a tar
    assert wait_until(lambda: dockerd_answers(container_name), "dockerd in the VM",
                      timeout=BOOTED) == "overlay2"
    image = subprocess.run(["docker", "save", busybox_image], capture_output=True,
                           check=True, timeout=120).stdout
    loaded = subprocess.run(["docker", "exec", "-i", container_name, "docker", "load"],
                            input=image, capture_output=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    inner = sh("docker", "exec", container_name, "docker", "run", "--rm", busybox_image, "sh",
               "-c", "echo inner; ip -4 addr show eth0 | grep -c inet", timeout=300)
    assert inner.stdout == "inner\n1\n"
    # a clean stop with the image's STOPSIGNAL, and the image store survives a restart
    sh("docker", "stop", "-t", "60", container_name, timeout=120)
    assert sh("docker", "inspect", "-f", "{{.State.ExitCode}}", container_name).stdout.strip() \
        == "0"
    sh("docker", "start", container_name)
    wait_until(lambda: dockerd_answers(container_name), "dockerd after a restart",
               timeout=BOOTED)
    assert busybox_image in sh("docker", "exec", container_name, "docker", "images",
                               "--format", "{{.Repository}}").stdout
    # ... and the VM's removal: the backing file is on a volume
    sh("docker", "rm", "-f", container_name)
    run_system(system_image, container_name, disk_volume, kernel)
    wait_until(lambda: dockerd_answers(container_name), "dockerd in a new VM", timeout=BOOTED)
    assert busybox_image in sh("docker", "exec", container_name, "docker", "images",
                               "--format", "{{.Repository}}").stdout


RUNC_SYSTEMD = ["--tmpfs", "/run", "--tmpfs", "/run/lock", "-v",
                "/sys/fs/cgroup:/sys/fs/cgroup:ro"]


@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_systemds_console_is_in_docker_logs_with_a_terminal(system_image, container_name,
                                                            runtime):
    """With -t, systemd's console (its status lines, its shutdown) is the terminal, as
    runc binds it to /dev/console; runc needs the flags a systemd container needs."""
    flags = RUNC_SYSTEMD if runtime == "runc" else []
    sh("docker", "run", "-d", "-t", f"--runtime={runtime}", "--name", container_name, *flags,
       system_image)
    wait_until(lambda: "Reached target" in sh("docker", "logs", container_name).stdout,
               "systemd's console in docker logs", timeout=BOOTED, interval=1)
    sh("docker", "stop", "-t", "60", container_name, timeout=120)
    out = sh("docker", "logs", container_name).stdout
    assert "Detected architecture x86-64." in out
    assert out.rstrip().endswith("Exiting container.")


KERNEL_WORK = ("modprobe squashfs && grep -c squashfs /proc/filesystems; "
               "truncate -s 32M /loop.img && mke2fs -q /loop.img && mkdir -p /mnt/loop && "
               "mount -o loop /loop.img /mnt/loop && echo x > /mnt/loop/f && "
               "cat /mnt/loop/f && umount /mnt/loop; "
               "sysctl -q -w vm.swappiness=13 && cat /proc/sys/vm/swappiness")


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_workload_that_needs_the_kernel_itself(kernel, system_image):
    """Under runc each step fails (no module loading, no loop devices, /proc/sys
    read-only); in the VM each works, as root of its own kernel."""
    dkvm = docker_run("dkvm", "-e", f"DKVM_KERNEL={kernel}", system_image, "sh", "-c",
                      KERNEL_WORK)
    assert (dkvm.returncode, dkvm.stdout) == (0, "1\nx\n13\n"), dkvm.stderr
    runc = docker_run("runc", system_image, "sh", "-c", KERNEL_WORK)
    assert "1\n" not in runc.stdout and "x\n" not in runc.stdout and "13" not in runc.stdout


@pytest.mark.parametrize("value,error", [
    ("/d.img,/data,xfs,1g", "DKVM_DISKS: filesystem 'xfs' is not supported: use ext4, ext3, "
                            "ext2"),
    ("/d.img,/data,ext4", "DKVM_DISKS='/d.img,/data,ext4' is not valid"),
    ("d.img,/data,ext4,1g", "DKVM_DISKS: the file 'd.img' must be an absolute path"),
    ("/d.img,/data,ext4,1k", "DKVM_DISKS: a disk of 1024 bytes is too small"),
])
def test_a_bad_disk_fails_at_create_with_one_line(busybox_image, value, error):
    out = docker_run("dkvm", "-e", f"DKVM_DISKS={value}", busybox_image, "true")
    assert out.returncode == 125
    (line,) = dkvm_lines(out.stderr)
    assert error in line


def test_a_disk_on_a_read_only_path_fails_at_create(busybox_image):
    out = docker_run("dkvm", "--read-only", "-e", "DKVM_DISKS=/d.img,/data,ext4,64m",
                     busybox_image, "true")
    assert out.returncode == 125
    (line,) = dkvm_lines(out.stderr)
    assert "DKVM_DISKS: the file /d.img is on a read-only path" in line


def test_a_disk_in_the_containers_root_is_formatted_once_and_mounted(busybox_image,
                                                                     container_name):
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, "-e",
       "DKVM_DISKS=/d.img,/data,ext4,64m", busybox_image, "sh", "-c",
       "grep ' /data ' /proc/mounts | cut -d' ' -f3; cat /data/kept 2>/dev/null; "
       "echo kept > /data/kept")
    assert sh("docker", "wait", container_name, timeout=BOOTED).stdout.strip() == "0"
    sh("docker", "start", container_name)
    assert sh("docker", "wait", container_name, timeout=BOOTED).stdout.strip() == "0"
    assert sh("docker", "logs", container_name).stdout == "ext4\next4\nkept\n"


SERVICE = "mkdir /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www"
GET = ("exec 3<>/dev/tcp/{address}/8080 && printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' >&3 "
       "&& timeout 10 cat <&3")


def test_a_docker_swarm_across_three_vms(system_image, busybox_image, docker):
    """Three VMs on one user-defined network, each running dockerd on its own disk:
    a swarm, a service of three replicas of a local image, reached through the
    routing mesh (vxlan overlay and IPVS in the guest kernels) from every node."""
    tag = uuid.uuid4().hex[:8]
    network, nodes = f"dkvm-swarm-{tag}", [f"dkvm-swarm-{tag}-{i}" for i in range(3)]
    sh("docker", "network", "create", network)
    try:
        for node in nodes:
            sh("docker", "run", "-d", "--runtime=dkvm", "--name", node, "--hostname", node,
               "--network", network, "-e", "DKVM_DISKS=/docker.img,/var/lib/docker,ext4,4g",
               system_image)
        image = subprocess.run(["docker", "save", busybox_image], capture_output=True,
                               check=True, timeout=120).stdout
        for node in nodes:
            wait_until(lambda: dockerd_answers(node), f"dockerd in {node}", timeout=BOOTED)
            loaded = subprocess.run(["docker", "exec", "-i", node, "docker", "load"],
                                    input=image, capture_output=True, timeout=300)
            assert loaded.returncode == 0, loaded.stderr
        address = {node: sh("docker", "inspect", "-f",
                            f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
                            node).stdout.strip() for node in nodes}
        sh("docker", "exec", nodes[0], "docker", "swarm", "init", "--advertise-addr",
           address[nodes[0]])
        token = sh("docker", "exec", nodes[0], "docker", "swarm", "join-token", "-q",
                   "worker").stdout.strip()
        for node in nodes[1:]:
            sh("docker", "exec", node, "docker", "swarm", "join", "--token", token,
               f"{address[nodes[0]]}:2377", timeout=120)
        sh("docker", "exec", nodes[0], "docker", "service", "create", "--detach",
           "--no-resolve-image", "--name", "web", "--replicas", "3", "--publish",
           "8080:80", busybox_image, "sh", "-c", SERVICE, timeout=120)
        wait_until(lambda: sh("docker", "exec", nodes[0], "docker", "service", "ls",
                              "--format", "{{.Replicas}}", check=False).stdout.strip()
                   == "3/3", "three replicas running", timeout=BOOTED, interval=2)
        for node in nodes:
            answer = poll(lambda: sh("docker", "exec", node, "bash", "-c",
                                     GET.format(address=address[node]), check=False).stdout,
                          lambda out: " 200 OK" in out, 120, 2)
            assert " 200 OK" in answer, f"{node}: {answer!r}"
    finally:
        for node in nodes:
            sh("docker", "rm", "-f", node, check=False, timeout=120)
        sh("docker", "network", "rm", network, check=False)
