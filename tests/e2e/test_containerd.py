"""containerd as Kubernetes drives it (CRI): the network namespace is made outside the
runtime, under /run/netns, and given to it by path; `ctr --with-ns` does the same.
The same commands with runc and with dkvm-runtime as the runc binary, compared."""
import shutil
import subprocess

import pytest

from dockerutil import HTTPD, RUN_TIMEOUT, http_get, load_into_engine, sh
from waiting import poll

pytestmark = pytest.mark.slow

SOCKET = "/var/run/docker/containerd/containerd.sock"     # dockerd's containerd
NAMESPACE = "dkvm-test"
IMAGE_REF = "docker.io/library/dkvm-test-busybox:latest"
NETNS = "dkvm-test-ns"
HOST_IP, GUEST_IP = "10.231.7.1", "10.231.7.2"


def ctr(*args, timeout=RUN_TIMEOUT, check=True):
    return subprocess.run(["ctr", "--address", SOCKET, "--namespace", NAMESPACE, *args],
                          capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def ctr_image(busybox_image):
    if not shutil.which("ctr"):
        pytest.skip("no ctr on this host")
    load_into_engine(busybox_image, ["ctr", "--address", SOCKET, "--namespace", NAMESPACE,
                                     "images", "import", "-"])
    return IMAGE_REF


@pytest.fixture
def netns():
    """A namespace as a CNI plugin leaves it: a veth to the host, an address, a route."""
    sh("ip", "netns", "add", NETNS)
    try:
        sh("ip", "link", "add", "dkvmtest0", "type", "veth", "peer", "name", "eth0",
           "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", "dkvmtest0")
        sh("ip", "link", "set", "dkvmtest0", "up")
        for command in (["addr", "add", f"{GUEST_IP}/24", "dev", "eth0"],
                        ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"],
                        ["route", "add", "default", "via", HOST_IP]):
            sh("ip", "-n", NETNS, *command)
        yield f"/var/run/netns/{NETNS}"
    finally:
        subprocess.run(["ip", "link", "del", "dkvmtest0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


def namespace_state():
    """What a CNI plugin and the pod's other containers see: links and addresses."""
    links = sh("ip", "-n", NETNS, "-o", "link", "show").stdout
    addrs = sh("ip", "-n", NETNS, "-o", "-4", "addr", "show", "eth0").stdout
    return sorted(line.split(":")[1].split("@")[0].strip() for line in links.splitlines()), \
        [line.split()[3] for line in addrs.splitlines()]


@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_a_namespace_given_by_path_serves_the_host_and_is_left_as_it_was(
        ctr_image, netns, runtime):
    binary = shutil.which("runc") if runtime == "runc" else "/usr/local/bin/dkvm-runtime"
    name = f"dkvm-test-ctr-{runtime}"
    before = namespace_state()
    ctr("run", "-d", "--runc-binary", binary, "--with-ns", f"network:{netns}", ctr_image,
        name, "sh", "-c", HTTPD.format(text=f"served-by-{runtime}"))
    try:
        assert http_get(GUEST_IP, timeout=120) == f"served-by-{runtime}"
    finally:
        ctr("tasks", "kill", "--signal", "SIGKILL", name, check=False)
        poll(lambda: ctr("tasks", "ls", check=False).stdout, lambda out: "RUNNING" not in out,
             timeout=60)
        ctr("tasks", "delete", name, check=False)
        ctr("containers", "delete", name, check=False)
    assert namespace_state() == before


def test_exit_codes_and_output_under_ctr_match_runc(ctr_image):
    outputs = {}
    for runtime in ("runc", "dkvm"):
        binary = shutil.which("runc") if runtime == "runc" else "/usr/local/bin/dkvm-runtime"
        out = ctr("run", "--rm", "--runc-binary", binary, ctr_image, f"dkvm-test-ctr-{runtime}",
                  "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
        outputs[runtime] = (out.returncode, out.stdout, out.stderr)
    assert outputs["dkvm"] == outputs["runc"] == (3, "out\n", "err\n")
