"""Where the boundary is, whatever the image or the flags say: an image's sandbox
or pod annotations do not take it out of its VM nor into a pod's (containerd's CRI
sandbox, proven by its bundle, is a pod's VM); `--privileged` is the workload's, in
its VM, and the container side stays as unprivileged as without it; what the guest
prints reaches the user's terminal only as visible text; systemd without kmod comes
up `running`."""
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import DEBIAN_PATH, debootstrap
from dockerutil import (KERNELS, RUN_TIMEOUT, docker_import, docker_run, image_exists,
                        load_into_engine, sh, with_stop_signal)
from waiting import poll, wait_until

pytestmark = pytest.mark.slow

PODMAN_ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
CTR_SOCKET = "/var/run/docker/containerd/containerd.sock"     # dockerd's containerd
CRI_NAMESPACE = "k8s.io"
CTR_IMAGE = "docker.io/library/dkvm-test-busybox:latest"
NOKMOD = "dkvm-test-system-nokmod"      # Debian with systemd, without kmod
BOOTED = 300                # systemd up in a TCG VM on a busy machine


def host_release():
    return os.uname().release


# --- 1. sandbox annotations ------------------------------------------------------------

def podman(*args, check=False, timeout=RUN_TIMEOUT):
    return subprocess.run(["podman", *args], capture_output=True, text=True,
                          timeout=timeout, check=check)


def annotated_image(base, annotations):
    """An OCI image whose manifest carries `annotations`, as anyone can publish one."""
    tag = f"localhost/dkvm-test-annotated-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "Containerfile").write_text(f"FROM {base}\n")
        podman("build", "--format", "oci", "-q", "-t", tag,
               *[arg for key, value in annotations.items()
                 for arg in ("--annotation", f"{key}={value}")], tmp, check=True)
    return tag


@pytest.mark.parametrize("annotations", [
    {"io.kubernetes.cri-o.ContainerType": "sandbox"},
    {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "0" * 64},
    {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "0" * 64},
], ids=["cri-o", "cri-forged-id", "cri-forged-member"])
def test_an_images_sandbox_annotation_does_not_take_it_out_of_the_vm(podman_image,
                                                                     guest_release,
                                                                     annotations):
    image = annotated_image(podman_image, annotations)
    try:
        name = f"dkvm-test-annotated-{uuid.uuid4().hex[:8]}"
        podman("create", "--name", name, *PODMAN_ULIMITS, image, "true", check=True)
        shown = podman("inspect", "-f", "{{json .Config.Annotations}}", name).stdout
        podman("rm", "-f", name)
        assert all(f'"{key}":"{value}"' in shown for key, value in annotations.items()), \
            "Podman no longer copies an image's annotations: the test proves nothing"
        out = podman("--runtime", "dkvm", "run", "--rm", *PODMAN_ULIMITS, image, "uname", "-r")
        assert (out.returncode, out.stdout.strip()) == (0, guest_release), out.stderr
        assert guest_release != host_release()
    finally:
        podman("rmi", "-f", image)


def ctr(*args, check=False, timeout=RUN_TIMEOUT):
    return subprocess.run(["ctr", "--address", CTR_SOCKET, "--namespace", CRI_NAMESPACE,
                           *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def cri_image(busybox_image):
    if not shutil.which("ctr"):
        pytest.skip("no ctr on this host")
    load_into_engine(busybox_image, ["ctr", "--address", CTR_SOCKET, "--namespace",
                                     CRI_NAMESPACE, "images", "import", "-"])
    return CTR_IMAGE


@pytest.mark.parametrize("own_id", [True, False], ids=["sandbox", "forged-id"])
def test_cris_own_sandbox_is_a_vm_too(cri_image, guest_release, own_id):
    """What containerd's CRI starts for a pod (k8s.io namespace, annotated with its own
    id) is the pod's VM, whose directory on the host goes with it; the same annotations
    on another container make a VM of its own. No container runs as runc runs it."""
    name = f"dkvm-test-cri-{uuid.uuid4().hex[:8]}"
    sandbox_id = name if own_id else "another-sandbox"
    out = ctr("run", "--rm", "--runc-binary", "/usr/local/bin/dkvm-runtime",
              "--annotation", "io.kubernetes.cri.container-type=sandbox",
              "--annotation", f"io.kubernetes.cri.sandbox-id={sandbox_id}",
              cri_image, name, "uname", "-r")
    try:
        assert (out.returncode, out.stdout.strip()) == (0, guest_release), out.stderr
        assert guest_release != host_release()
        assert not os.path.lexists(f"/run/dkvm/pods/{name}")   # deleted with the sandbox
    finally:
        ctr("tasks", "kill", "--signal", "SIGKILL", name)
        ctr("containers", "delete", name)


# --- 7. --privileged is the workload's ---------------------------------------------------

def container_side(name):
    """What the host kernel lets the container side (the entrypoint and QEMU) do."""
    pid = sh("docker", "inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    status = {}
    for who, number in [("entrypoint", pid)] + [("child", c) for c in children]:
        fields = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{number}/status").read_text().splitlines() if ":\t" in line)
        comm = Path(f"/proc/{number}/comm").read_text().strip()
        status[f"{who}:{comm}"] = {key: fields[key].strip() for key in
                                   ("CapEff", "CapBnd", "CapPrm", "Seccomp", "NoNewPrivs")}
    mounts = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        point, options = fields[4], fields[5].split(",")
        if point.startswith(("/proc", "/sys", "/dev")):
            mounts[point] = "ro" if "ro" in options else "rw"
    cgroups = dict(line.split(":", 2)[1:] for line in
                   Path(f"/proc/{pid}/cgroup").read_text().splitlines())
    devices = Path(f"/sys/fs/cgroup/devices{cgroups['devices']}/devices.list").read_text()
    return {"status": status, "mounts": mounts, "devices": sorted(devices.split("\n"))}


def start_and_wait(name, *flags):
    """The workload's output once it runs: the VM booted (QEMU and virtiofsd work
    under the container side's confinement)."""
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", name, *flags, "dkvm-test-busybox",
       "sh", "-c", "grep CapEff /proc/self/status; echo ready; exec sleep 600")

    def output():
        out = sh("docker", "logs", name).stdout
        return "ready" in out and out
    return wait_until(output, f"{name}'s workload", timeout=180)


def test_privileged_leaves_the_container_side_as_unprivileged_as_without_it(busybox_image):
    """Seen from the host: the entrypoint's and QEMU's and virtiofsd's capabilities,
    seccomp and no-new-privileges, the mounts of /proc, /sys and /dev and the device
    cgroup are the same with `--privileged` (or seccomp and system paths unconfined)
    as without; a QEMU escape gets no more with it."""
    flags = {"plain": [], "priv": ["--privileged"],
             "unconfined": ["--security-opt", "seccomp=unconfined",
                            "--security-opt", "systempaths=unconfined"]}
    names = {kind: f"dkvm-test-{kind}-{uuid.uuid4().hex[:8]}" for kind in flags}
    try:
        outputs = {kind: start_and_wait(names[kind], *flags[kind]) for kind in flags}
        seen = {kind: container_side(name) for kind, name in names.items()}
    finally:
        for name in names.values():
            sh("docker", "rm", "-f", name, check=False, timeout=60)
    # the workload in its VM: every capability with --privileged (and the guest's devices)
    assert "CapEff:\t000001ffffffffff" in outputs["priv"]
    assert "CapEff:\t000001ffffffffff" not in outputs["plain"]
    plain, priv = seen["plain"], seen["priv"]
    assert priv["status"] == plain["status"]
    assert priv["mounts"] == plain["mounts"]
    assert priv["devices"] == plain["devices"]
    assert seen["unconfined"] == plain
    # and what that is: no write to the host's /proc/sys, /sys, cgroupfs; seccomp on;
    # no access to the host's disks
    assert {priv["mounts"][p] for p in ("/sys", "/proc/sys", "/proc/bus", "/proc/irq")} \
        == {"ro"}
    assert {mode for p, mode in priv["mounts"].items() if p.startswith("/sys/fs/cgroup/")} \
        == {"ro"}
    assert "/sys/firmware" in priv["mounts"]        # masked
    assert {s["Seccomp"] for s in priv["status"].values()} == {"2"}
    assert "a *:* rwm" not in priv["devices"]
    assert not [line for line in priv["devices"] if line.startswith("b ") and
                not line.startswith("b *:* m")]


# --- 9. the guest's text in an error line ------------------------------------------------

SPOOF = r"\033]0;pwned\007\033[2K\r\033[32mall good\033[0m"


def test_escape_sequences_from_the_guest_console_reach_the_terminal_as_text(busybox_image):
    """A workload (root in its VM) that writes escape sequences to the kernel's console
    and resets the machine at once (sysrq, which Debian's kernel has): the error quotes
    the console's tail, and the user's terminal and `docker logs` get it as visible
    text."""
    if "debian" not in KERNELS:
        pytest.skip("no debian kernel in the payload")
    script = (f"printf '<0>{SPOOF} spoofed\\n' > /dev/kmsg; "
              "echo b > /proc/sysrq-trigger; sleep 60")
    out = docker_run("dkvm", "--privileged", "-e", "DKVM_KERNEL=debian", busybox_image,
                     "sh", "-c", script)
    assert out.returncode != 0
    assert "guest console:" in out.stderr and "spoofed" in out.stderr, out.stderr
    assert "\x1b" not in out.stderr and "\x07" not in out.stderr and "\r" not in out.stderr
    assert "\\x1b]0;pwned\\x07\\x1b[2K" in out.stderr, out.stderr


# --- 13. systemd without kmod --------------------------------------------------------------

@pytest.fixture(scope="module")
def nokmod_image(docker):
    """Debian with systemd as its init and no kmod: a minimal systemd image."""
    if not image_exists(NOKMOD):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            debootstrap(root, ["systemd", "systemd-sysv"])
            assert not (root / "bin" / "kmod").exists()
            docker_import(root, NOKMOD + "-base", [DEBIAN_PATH, 'CMD ["/sbin/init"]'])
        with_stop_signal(NOKMOD + "-base", NOKMOD, "SIGRTMIN+3")
    return NOKMOD


def system_state(name):
    return sh("docker", "exec", name, "systemctl", "is-system-running", check=False).stdout.strip()


@pytest.mark.parametrize("kernel", KERNELS)
def test_systemd_without_kmod_comes_up_running(nokmod_image, container_name, kernel):
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name,
       "-e", f"DKVM_KERNEL={kernel}", nokmod_image)
    state = poll(lambda: system_state(container_name),
                 lambda s: s in ("running", "degraded"), BOOTED, 2)
    failed = sh("docker", "exec", container_name, "systemctl", "--failed", "--no-legend",
                check=False).stdout
    assert state == "running", f"systemd is {state!r}; failed units: {failed}"
    # DKVM still made the nodes of the devices whose module loads on open
    checked = sh("docker", "exec", container_name, "sh", "-c",
                 "test -c /dev/net/tun && test -c /dev/loop-control && "
                 "test ! -e /lib/modules/$(uname -r)/modules.devname && echo ok",
                 check=False)
    assert checked.stdout.strip() == "ok", checked.stderr
    sh("docker", "rm", "-f", container_name, check=False, timeout=60)
