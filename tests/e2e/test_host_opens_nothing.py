"""The host opens nothing the image or the container side names: the runtime, as host
root, makes `--read-only` mount points without opening what the image has there (a
FIFO would hang `docker run`, a device would run its host driver's open), reaches the
entrypoint's signal socket without following a link the container side put there,
and never mounts a volume elsewhere than runc would. Compared with runc."""
import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

from dockerutil import (PATH_ENV, busybox_tree, dkvm_lines, docker_import, docker_run,
                        image_exists, logs, sh)
from waiting import wait_until

NODES = "dkvm-test-hostile-nodes"
BOOTED = 120
RUN_BOUND = 180        # a hung `docker run` fails the test (docker_run removes the container)


def unregistered_char_major():
    """A character major no driver has here (Linux's "local/experimental use"): opening
    a node of it fails with ENXIO, where the runtime opening it is seen."""
    text = Path("/proc/devices").read_text()
    used = {int(line.split()[0]) for line in text.split("Block devices:")[0].splitlines()
            if line.strip()[:1].isdigit()}
    return next(major for major in (60, 61, 62, 63, 120, 121) if major not in used)


@pytest.fixture(scope="module")
def nodes_image(busybox_image):
    """busybox with a FIFO at /sbin/docker-init (where `--init` binds), a device node
    at /etc/device (a file bind's destination), and /dir a link to a name that is not
    UTF-8."""
    if not image_exists(NODES):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            busybox_tree(root)
            (root / "sbin").mkdir()
            os.mkfifo(root / "sbin/docker-init")
            os.mknod(root / "etc/device", 0o20644, os.makedev(unregistered_char_major(), 7))
            os.symlink(b"\xff", os.fsencode(root / "dir"))
            docker_import(root, NODES, [PATH_ENV])
    return NODES


@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_a_fifo_where_init_binds_with_a_read_only_root(nodes_image, runtime):
    """runc mounts docker-init over the FIFO; DKVM must not open it (it would wait
    for a reader forever) and runs the same."""
    out = docker_run(runtime, "--read-only", "--init", nodes_image, "sh", "-c",
                     "echo pid1=$(cat /proc/1/comm)", timeout=RUN_BOUND)
    assert (out.returncode, out.stdout) == (0, "pid1=docker-init\n"), out.stderr


@pytest.mark.parametrize("destination", ["/etc/device", "/etc/new-file"])
@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_a_device_node_where_a_file_binds_with_a_read_only_root(nodes_image, runtime,
                                                                destination):
    """A node of a major no driver has: the runtime opening it would fail create. (And
    where nothing is, the mount point is made, as runc makes it.)"""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as host_file:
        host_file.write("from the host\n")
        host_file.flush()
        out = docker_run(runtime, "--read-only", "-v", f"{host_file.name}:{destination}:ro",
                         nodes_image, "cat", destination, timeout=RUN_BOUND)
    assert (out.returncode, out.stdout) == (0, "from the host\n"), out.stderr


def test_a_volume_through_a_link_to_a_name_not_utf8(nodes_image, tmp_path):
    """runc mounts at /\\xff/y (the link followed in the image); an OCI config cannot
    name that path to runc, so DKVM refuses with one line naming the destination,
    instead of mounting the volume at another path."""
    (tmp_path / "marker").write_text("on the volume\n")
    volume = f"{tmp_path}:/dir/y"
    script = "cat /dir/y/marker; for d in /*/y; do echo $d | od -An -tx1; done"
    runc = docker_run("runc", "-v", volume, nodes_image, "sh", "-c", script)
    assert runc.returncode == 0, runc.stderr
    assert runc.stdout.startswith("on the volume\n") and " 2f ff 2f 79 0a" in runc.stdout
    dkvm = docker_run("dkvm", "-v", volume, nodes_image, "sh", "-c", script)
    assert dkvm.returncode == 125 and dkvm.stdout == ""
    assert any("mount destination /dir/y: the image's links lead it to /\\xff/y, a name that "
               "is not UTF-8" in line for line in dkvm_lines(dkvm.stderr)), dkvm.stderr
    assert "Traceback" not in dkvm.stderr


def test_a_signal_socket_swapped_for_a_link_is_not_followed(busybox_image, container_name):
    """With QEMU's uid the container side can replace /run/signal.sock by a link to a
    host socket: `docker kill` must not connect to it, and still kills the container
    (exit 137, as under runc)."""
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, busybox_image,
       "sh", "-c", "echo ready; while :; do sleep 1; done")
    wait_until(lambda: "ready" in logs(container_name), "the workload to start",
               timeout=BOOTED)
    pid = sh("docker", "inspect", "-f", "{{.State.Pid}}", container_name).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        host_socket = os.path.join(tmp, f"host-{uuid.uuid4().hex[:6]}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(host_socket)
        listener.listen(4)
        listener.setblocking(False)
        swapped = f"/proc/{pid}/root/run/signal.sock"
        os.unlink(swapped)
        os.symlink(host_socket, swapped)
        sh("docker", "kill", container_name, timeout=60)
        assert sh("docker", "wait", container_name, timeout=60).stdout.strip() == "137"
        with pytest.raises(BlockingIOError):
            listener.accept()
        listener.close()
