"""Podman (rootful, its default bridge network and --network none) with runc and with
DKVM as its runtime, compared. This machine lacks CAP_SYS_RESOURCE: Podman's default
ulimits fail even under runc, so both get explicit ones."""
import http.server
import subprocess
import threading

import pytest

from dockerutil import HTTPD, RUN_TIMEOUT, http_get

pytestmark = pytest.mark.slow

ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
# "dkvm" by name: the runtime `dkvm install` registered in containers.conf.d
RUNTIMES = {"runc": [], "dkvm": ["--runtime", "dkvm"]}
PUBLISHED = {"runc": 18181, "dkvm": 18182}      # `-p` on the host, one per runtime


def podman(runtime, *args, check=False, timeout=RUN_TIMEOUT):
    return subprocess.run(["podman", *RUNTIMES[runtime], *args], capture_output=True,
                          text=True, timeout=timeout, check=check)


@pytest.fixture
def names():
    made = []
    yield lambda runtime: made.append(f"dkvm-test-podman-{runtime}") or made[-1]
    for name in made:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=60)


def compare(image, script, *flags):
    results = {}
    for runtime in RUNTIMES:
        out = podman(runtime, "run", "--rm", *ULIMITS, *flags, image, "sh", "-c", script)
        results[runtime] = (out.returncode, out.stdout, out.stderr)
    assert results["dkvm"] == results["runc"]
    return results["runc"]


def test_the_default_network_stdio_and_exit_codes_match_runc(podman_image):
    assert compare(podman_image, "echo out; echo err >&2; ls /sys/class/net; "
                                 "ip -o -4 addr show eth0 | grep -c 'inet 10.88.'; exit 3") == \
        (3, "out\neth0\nlo\n1\n", "err\n")


def test_network_none_matches_runc(podman_image):
    assert compare(podman_image, "ls /sys/class/net", "--network", "none") == (0, "lo\n", "")


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_a_volume_is_read_and_written_as_under_runc(podman_image, tmp_path, runtime):
    (tmp_path / "file").write_text("from the host\n")
    out = podman(runtime, "run", "--rm", *ULIMITS, "-v", f"{tmp_path}:/data", podman_image,
                 "sh", "-c", "cat /data/file; echo from the container >> /data/file")
    assert (out.returncode, out.stdout) == (0, "from the host\n")
    assert (tmp_path / "file").read_text() == "from the host\nfrom the container\n"


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_a_server_exec_and_stop_match_runc(podman_image, names, runtime):
    """The host reaches a server at the container's address on Podman's bridge, and
    at the port `-p` publishes; exec's output and status come back; stop ends the
    container."""
    name = names(runtime)
    port = PUBLISHED[runtime]
    podman(runtime, "run", "-d", "--name", name, *ULIMITS, "-p", f"{port}:8080",
           podman_image, "sh", "-c", HTTPD.format(text=f"served-by-{runtime}"), check=True)
    ip = podman(runtime, "inspect", "-f", "{{.NetworkSettings.IPAddress}}", name,
                check=True).stdout.strip()
    assert http_get(ip, timeout=120) == f"served-by-{runtime}"
    assert http_get("127.0.0.1", timeout=30, port=port) == f"served-by-{runtime}"
    out = podman(runtime, "exec", name, "sh", "-c", "echo hi; echo oops >&2; exit 5")
    assert (out.returncode, out.stdout, out.stderr) == (5, "hi\n", "oops\n")
    podman(runtime, "stop", "-t", "2", name, check=True)
    state = podman(runtime, "inspect", "-f", "{{.State.Status}}", name, check=True)
    assert state.stdout.strip() == "exited"


def test_a_user_namespace_maps_ids_as_under_runc(podman_image):
    """`--uidmap`: the workload is root in a user namespace of its own (the guest makes
    it), sees the image's files as its own, and what it writes is its own too. (Its
    CAP_DAC_OVERRIDE does not reach the export: a write into a directory without write
    permission fails under DKVM; see the README.)"""
    script = ("id; cat /proc/self/uid_map /proc/self/gid_map; ls -ln /bin/busybox | "
              "cut -c1-40; echo hi > /etc/written; ls -ln /etc/written | cut -c1-40")
    out = compare(podman_image, script, "--uidmap", "0:100000:65536",
                  "--gidmap", "0:200000:65536")
    assert out[0] == 0 and "uid=0(root) gid=0(root)" in out[1]
    assert "0     100000      65536" in out[1] and "0     200000      65536" in out[1]


class HostPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"from-the-host\n")

    def log_message(self, *args):
        pass


def test_slirp4netns_reaches_the_host_as_under_runc(podman_image):
    """`--network slirp4netns`: the namespace's tap0 (slirp's) becomes the VM's NIC,
    and the host is reached through slirp's NAT."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), HostPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                              check=True).stdout.split()[0]
        script = ("ip -o -4 addr show tap0 | tr -s ' ' | cut -d' ' -f2-4; "
                  "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | "
                  f"nc -w 10 {host} {server.server_port} | tail -1")
        assert compare(podman_image, script, "--network", "slirp4netns") == \
            (0, "tap0 inet 10.0.2.100/24\nfrom-the-host\n", "")
    finally:
        server.shutdown()
