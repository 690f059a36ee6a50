"""End-to-end fixtures: the real dockerd, runc and QEMU, on images built here.

Nothing can be pulled on these machines, so every image is made locally: busybox
(a static busybox tree), static (one static binary and nothing else) and debian
(debootstrap minbase). Each is built once and kept by tag.
"""
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from dockerutil import (BUSYBOX, DEBIAN, KERNEL, PATH_ENV, STATIC, SYSTEM, busybox_tree,
                        docker_import, image_exists, load_into_engine, sh, with_stop_signal)

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def docker():
    info = sh("docker", "info", "--format", "{{json .Runtimes}}", check=False, timeout=30)
    if info.returncode != 0:
        pytest.fail("dockerd is not reachable: run the README's set-up first "
                    f"({info.stderr.strip()})")
    if '"dkvm"' not in info.stdout:
        pytest.fail("the dkvm runtime is not registered: run `python3 dist/dkvm.pyz install`")
    return True


@pytest.fixture(scope="session")
def busybox_image(docker):
    if not image_exists(BUSYBOX):
        with tempfile.TemporaryDirectory() as tmp:
            busybox_tree(Path(tmp))
            docker_import(Path(tmp), BUSYBOX, [PATH_ENV])
    return BUSYBOX


@pytest.fixture(scope="session")
def static_image(docker):
    if not image_exists(STATIC):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            root.mkdir()
            sh("gcc", "-static", "-O2", "-o", str(root / "hello"), str(HERE / "images" / "hello.c"))
            docker_import(root, STATIC, ['ENTRYPOINT ["/hello"]'])
    return STATIC


DEBIAN_PATH = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def debootstrap(root, packages=()):
    """A Debian bookworm minbase tree (and `packages`) at `root`, without apt's cache."""
    sh("debootstrap", "--variant=minbase", *([f"--include={','.join(packages)}"] if packages
                                             else []), "bookworm", str(root),
       os.environ.get("DKVM_TEST_MIRROR", "http://deb.debian.org/debian"), timeout=900)
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)


@pytest.fixture(scope="session")
def debian_image(docker):
    if not image_exists(DEBIAN):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            debootstrap(root)
            docker_import(root, DEBIAN, [DEBIAN_PATH, 'CMD ["bash"]'])
    return DEBIAN


@pytest.fixture(scope="session")
def system_image(docker):
    """Debian with systemd as its init and Docker (docker.io) as a service, stopped
    with systemd's SIGRTMIN+3, as systemd images are."""
    if not image_exists(SYSTEM):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            debootstrap(root, ["systemd", "systemd-sysv", "docker.io", "iptables", "kmod",
                               "procps"])
            docker_import(root, SYSTEM + "-base", [DEBIAN_PATH, 'CMD ["/sbin/init"]'])
        with_stop_signal(SYSTEM + "-base", SYSTEM, "SIGRTMIN+3")
    return SYSTEM


@pytest.fixture(scope="session")
def kernel_image(docker):
    """Debian with kernels of its own, for DKVM_KERNEL=image: the stock one
    (linux-image-amd64, /vmlinuz) and the cloud one (another release), with their
    modules; the initramfs images Debian made for them are not needed."""
    if not image_exists(KERNEL):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            debootstrap(root, ["linux-image-amd64", "linux-image-cloud-amd64", "kmod"])
            for initrd in (root / "boot").glob("initrd.img-*"):
                initrd.unlink()
            docker_import(root, KERNEL, [DEBIAN_PATH, 'CMD ["bash"]'])
    return KERNEL


POLICY_FILE = Path("/etc/dkvm/policy.json")


@pytest.fixture
def operator_allows(docker):
    """operator_allows("DKVM_SYS_ADMIN", ...): the host's policy file lets containers set
    these options that weaken the boundary, for this test; the file is as it was
    afterwards (the e2e tests run one at a time, under the docker lock)."""
    before = POLICY_FILE.read_bytes() if POLICY_FILE.exists() else None

    def allow(*names):
        import json
        POLICY_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = POLICY_FILE.with_name("policy.json.test")
        tmp.write_text(json.dumps({"container_may_set": list(names)}) + "\n")
        tmp.chmod(0o644)
        tmp.replace(POLICY_FILE)
    yield allow
    if before is None:
        POLICY_FILE.unlink(missing_ok=True)
    else:
        POLICY_FILE.write_bytes(before)


@pytest.fixture
def container_name(docker):
    """A unique name, and the container removed afterwards whatever happened."""
    name = f"dkvm-test-{uuid.uuid4().hex[:10]}"
    yield name
    sh("docker", "rm", "-f", name, check=False, timeout=60)


@pytest.fixture(scope="session")
def guest_release(docker):
    """The default kernel's release: its row in `dkvm kernels` is marked `*`."""
    rows = [line.split() for line in sh("dkvm", "kernels").stdout.splitlines()]
    (release,) = [row[1] for row in rows if row and row[0].endswith("*") and row[0] != "*"]
    return release


PODMAN_BUSYBOX = "localhost/dkvm-test-busybox:latest"


@pytest.fixture(scope="session")
def podman_image(busybox_image):
    """The busybox image in Podman's store (where `podman load` names it)."""
    if not shutil.which("podman"):
        pytest.skip("no podman on this host")
    load_into_engine(busybox_image, ["podman", "load"])
    return PODMAN_BUSYBOX
