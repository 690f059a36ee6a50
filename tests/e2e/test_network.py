"""The VM has the container's network: runc as the oracle, peers on the same bridge."""
import urllib.request
from pathlib import Path

import pytest

from dockerutil import HTTPD, dkvm_lines, docker_run, sh
from waiting import poll

HERE = Path(__file__).resolve().parent

NET = "dkvm-test-net"
SUBNET, GATEWAY = "10.123.45.0/24", "10.123.45.1"
MTU_NET = "dkvm-test-net-mtu"
# busybox's static wget crashes under runc here (glibc NSS); nc speaks HTTP well enough
HTTP_GET = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8080 | tail -n 1"


@pytest.fixture(scope="module")
def networks(docker):
    for name in (NET, MTU_NET):
        sh("docker", "network", "rm", name, check=False)
    sh("docker", "network", "create", "--subnet", SUBNET, "--gateway", GATEWAY, NET)
    sh("docker", "network", "create", "--opt", "com.docker.network.driver.mtu=1400", MTU_NET)
    yield NET
    for name in (NET, MTU_NET):
        sh("docker", "network", "rm", name, check=False)


def identity(out):
    """What a network-aware user would compare: MAC, addresses, MTU, routes."""
    keep = []
    for line in out.splitlines():
        words = line.split()
        if "mtu" in words:
            name = words[1].split("@")[0].rstrip(":")     # a veth shows as eth0@ifN
            keep.append(f"{name} mtu {words[words.index('mtu') + 1]}")
        elif words and words[0] in ("link/ether", "inet", "inet6"):
            keep.append(" ".join(words[:2]) + (" brd " + words[3] if "brd" in words[2:3] else ""))
        elif words and words[0] in ("default",) or (words and "/" in words[0]):
            keep.append(line.strip())
    return keep


def test_interface_identity_matches_runc(busybox_image, networks):
    args = ["--network", NET, "--ip", "10.123.45.10",   # the MAC follows from the IP
            busybox_image, "sh", "-c", "ip addr show eth0; ip route"]
    runc, dkvm = docker_run("runc", *args), docker_run("dkvm", *args)
    assert dkvm.returncode == runc.returncode == 0, dkvm.stderr
    assert identity(dkvm.stdout) == identity(runc.stdout)
    assert "10.123.45.10/24" in dkvm.stdout and "02:42:0a:7b:2d:0a" in dkvm.stdout


def test_custom_mtu(busybox_image, networks):
    out = docker_run("dkvm", "--network", MTU_NET, busybox_image, "cat", "/sys/class/net/eth0/mtu")
    assert out.stdout.strip() == "1400", out.stderr


def test_network_none_has_only_loopback(busybox_image):
    args = ["--network", "none", busybox_image, "ls", "/sys/class/net"]
    runc, dkvm = docker_run("runc", *args), docker_run("dkvm", *args)
    assert dkvm.stdout == runc.stdout == "lo\n"


@pytest.mark.parametrize("mode", ["host", "container"])
def test_unsupported_network_modes_are_refused(busybox_image, container_name, mode):
    target = "host"
    if mode == "container":
        sh("docker", "run", "-d", "--name", container_name, busybox_image, "sleep", "60")
        target = f"container:{container_name}"
    out = docker_run("dkvm", "--network", target, busybox_image, "true")
    assert out.returncode == 125
    assert f"--network {'host' if mode == 'host' else 'container:NAME'} is not supported" in out.stderr


def start_httpd(runtime, name, image, text, *flags):
    sh("docker", "run", "-d", f"--runtime={runtime}", "--name", name, *flags, image,
       "sh", "-c", HTTPD.format(text=text))
    return sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
              name).stdout.strip()


def fetch_until(url_fetch, expected, timeout=120):
    """What `url_fetch()` gives once it is `expected` (the VM may still be booting), or
    the last it gave."""
    return poll(url_fetch, lambda got: got == expected, timeout, interval=0.5)


@pytest.fixture
def vm_server(busybox_image, networks):
    name = "dkvm-test-vm-httpd"
    sh("docker", "rm", "-f", name, check=False)
    ip = start_httpd("dkvm", name, busybox_image, "from-vm", "--network", NET,
                     "-p", "127.0.0.1:18080:8080")
    yield ip
    sh("docker", "rm", "-f", name, check=False)


def test_runc_peer_reaches_the_vm_and_the_host_reaches_a_published_port(busybox_image, vm_server):
    def from_peer():
        out = docker_run("runc", "--network", NET, busybox_image, "sh", "-c",
                         HTTP_GET.format(ip=vm_server))
        return out.stdout.strip()
    assert fetch_until(from_peer, "from-vm") == "from-vm"

    def from_host():
        try:
            with urllib.request.urlopen("http://127.0.0.1:18080/", timeout=5) as resp:
                return resp.read().decode().strip()
        except OSError:
            return None
    assert fetch_until(from_host, "from-vm") == "from-vm"


def test_vm_reaches_a_runc_peer(busybox_image, networks, container_name):
    ip = start_httpd("runc", container_name, busybox_image, "from-runc", "--network", NET)
    out = docker_run("dkvm", "--network", NET, busybox_image, "sh", "-c",
                     f"for i in $(seq 20); do {HTTP_GET.format(ip=ip)} | grep . && exit 0; "
                     "sleep 0.5; done; exit 1")
    assert (out.returncode, out.stdout.strip()) == (0, "from-runc"), out.stderr


def test_default_bridge_gateway_reachable(busybox_image):
    out = docker_run("dkvm", busybox_image, "sh", "-c",
                     "ping -c 1 -W 5 $(ip route | awk '/default/ {print $3}') >/dev/null && echo ok")
    assert out.stdout.strip() == "ok", out.stderr


def test_names_resolve_through_dockers_embedded_dns_both_ways(busybox_image, networks,
                                                              container_name):
    """A runc peer and a DKVM VM on one user-defined network find each other by name
    and by --network-alias."""
    vm = f"{container_name}-vm"
    try:
        start_httpd("dkvm", vm, busybox_image, "vm-by-name", "--network", NET,
                    "--network-alias", "vm-alias")
        start_httpd("runc", container_name, busybox_image, "runc-by-name", "--network", NET,
                    "--network-alias", "runc-alias")
        for target, text in ((vm, "vm-by-name"), ("vm-alias", "vm-by-name")):
            def from_runc():
                return docker_run("runc", "--network", NET, busybox_image, "sh", "-c",
                                  HTTP_GET.format(ip=target)).stdout.strip()
            assert fetch_until(from_runc, text) == text
        out = docker_run("dkvm", "--network", NET, busybox_image, "sh", "-c",
                         f"nslookup {container_name} >/dev/null && "
                         + HTTP_GET.format(ip=container_name) + " && "
                         + HTTP_GET.format(ip="runc-alias"))
        assert out.stdout.split() == ["runc-by-name", "runc-by-name"], out.stderr
    finally:
        sh("docker", "rm", "-f", vm, check=False)


V6_NET = "dkvm-test-net-v6"


@pytest.fixture(scope="module")
def ipv6_network(docker):
    sh("docker", "network", "rm", V6_NET, check=False)
    sh("docker", "network", "create", "--ipv6", "--subnet", "fd00:dcba:1::/64",
       "--subnet", "10.124.46.0/24", V6_NET)
    yield V6_NET
    sh("docker", "network", "rm", V6_NET, check=False)


def test_ipv6_network_matches_runc(busybox_image, ipv6_network):
    args = ["--network", V6_NET, "--ip", "10.124.46.20", "--ip6", "fd00:dcba:1::20",
            busybox_image, "sh", "-c",
            "ip addr show eth0; ip route; ip -6 route | grep -v -e '^multicast' -e '^fe80';"
            "ping6 -c 1 -W 5 fd00:dcba:1::1 >/dev/null && echo ping6-gateway-ok"]
    runc, dkvm = docker_run("runc", *args), docker_run("dkvm", *args)
    assert dkvm.returncode == runc.returncode == 0, dkvm.stderr
    assert identity(dkvm.stdout) == identity(runc.stdout)
    assert "fd00:dcba:1::20/64" in dkvm.stdout and "ping6-gateway-ok" in dkvm.stdout


def test_several_networks_attached_before_start(busybox_image, networks, ipv6_network,
                                                container_name):
    sh("docker", "create", "--runtime=dkvm", "--name", container_name, "--network", NET,
       busybox_image, "sh", "-c", "ls /sys/class/net; ip -4 addr | grep inet")
    sh("docker", "network", "connect", MTU_NET, container_name)
    sh("docker", "network", "connect", V6_NET, container_name)
    sh("docker", "start", "-a", container_name, timeout=240)
    out = sh("docker", "logs", container_name).stdout
    nets = sh("docker", "inspect", "-f",
              "{{range $k, $v := .NetworkSettings.Networks}}{{$v.IPAddress}} {{end}}",
              container_name).stdout.split()
    assert out.split("\n")[:4] == ["eth0", "eth1", "eth2", "lo"], out
    for ip in nets:
        assert f"inet {ip}/" in out


def test_dns_and_hosts_options_match_runc(busybox_image, networks):
    args = ["--network", NET, "--ip", "10.123.45.30", "--hostname", "vmname",
            "--domainname", "example.test", "--dns", "10.123.45.53", "--dns-search", "corp.test",
            "--dns-option", "ndots:3", "--add-host", "extra.test:10.9.8.7", busybox_image,
            "sh", "-c", "cat /etc/hosts /etc/resolv.conf /etc/hostname"]
    runc, dkvm = docker_run("runc", *args), docker_run("dkvm", *args)
    assert (dkvm.returncode, dkvm.stdout) == (runc.returncode, runc.stdout)
    assert "extra.test" in dkvm.stdout and "ndots:3" in dkvm.stdout


def test_published_udp_port_reaches_the_vm(busybox_image, networks, container_name, tmp_path):
    """busybox has no UDP server: a static one (images/udp_echo.c), from a volume."""
    import socket
    sh("gcc", "-static", "-O2", "-o", str(tmp_path / "udp_echo"),
       str(HERE / "images" / "udp_echo.c"))
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, "--network", NET,
       "-p", "127.0.0.1:19000:9000/udp", "-v", f"{tmp_path}:/srv:ro", busybox_image,
       "/srv/udp_echo")

    def echoed():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.sendto(b"hello-udp", ("127.0.0.1", 19000))
            try:
                return s.recvfrom(100)[0]
            except OSError:
                return None
    assert fetch_until(echoed, b"pong:hello-udp") == b"pong:hello-udp"


EXTERNAL_NAME = "deb.debian.org"     # the host resolves it: apt uses it


def test_external_names_resolve_on_a_user_defined_network_as_with_runc(busybox_image,
                                                                        networks):
    import socket
    try:
        socket.gethostbyname(EXTERNAL_NAME)
    except OSError:
        pytest.skip(f"this host cannot resolve {EXTERNAL_NAME}")
    # the answers only: nslookup prints its A and AAAA replies in the order they come
    cmd = [busybox_image, "sh", "-c",
           f"nslookup {EXTERNAL_NAME} | grep -E '^(Name:|Address: )' | sort"]
    runc = docker_run("runc", "--network", NET, *cmd)
    dkvm = docker_run("dkvm", "--network", NET, *cmd)
    assert runc.returncode == 0 and "Address" in runc.stdout, runc.stdout + runc.stderr
    assert (dkvm.returncode, dkvm.stdout) == (runc.returncode, runc.stdout), dkvm.stderr


HOTPLUG_NET = "a-dkvm-test-hotplug"     # sorts first: Docker moves the default gateway to it
SHOW_NETWORK = ("ip addr; ip route; ip -6 route | grep -v -e '^multicast' -e '^fe80';"
                "echo ::hosts; cat /etc/hosts")


@pytest.fixture(scope="module")
def hotplug_network(docker):
    sh("docker", "network", "rm", HOTPLUG_NET, check=False)
    sh("docker", "network", "create", "--subnet", "10.125.47.0/24", HOTPLUG_NET)
    yield HOTPLUG_NET
    sh("docker", "network", "rm", HOTPLUG_NET, check=False)


def network_view(name):
    out = sh("docker", "exec", name, "sh", "-c", SHOW_NETWORK, check=False).stdout
    return identity(out.split("::hosts")[0]), out.split("::hosts")[-1]


def test_network_connect_and_disconnect_while_running_match_runc(
        busybox_image, networks, hotplug_network, ipv6_network, container_name):
    """Docker never tells the runtime: the VM must follow a running container's
    networks being connected (NICs hot-plugged, the default gateway moved, /etc/hosts
    rewritten) and disconnected, as runc's container sees them, and stay healthy."""
    steps = [
        ("connect", "--ip", "10.125.47.40", HOTPLUG_NET),
        ("connect", "--ip", "10.124.46.40", "--ip6", "fd00:dcba:1::40", ipv6_network),
        ("disconnect", HOTPLUG_NET),
        ("disconnect", NET),                    # a NIC the VM booted with
        ("connect", "--ip", "10.125.47.41", HOTPLUG_NET),
    ]
    peer = f"{container_name}-peer"
    views = {}
    try:
        sh("docker", "run", "-d", "--name", peer, "--network", HOTPLUG_NET, busybox_image,
           "sleep", "600")
        for runtime in ("runc", "dkvm"):
            sh("docker", "rm", "-f", container_name, check=False)
            sh("docker", "run", "-d", f"--runtime={runtime}", "--name", container_name,
               "--network", NET, "--ip", "10.123.45.40", "--hostname", "hotplug", busybox_image,
               "sh", "-c", HTTPD.format(text=f"hot-{runtime}"))
            views[runtime] = [network_view(container_name)]
            for step in steps:
                sh("docker", "network", step[0], *step[1:], container_name)
                view = network_view(container_name)
                if runtime == "dkvm":        # the guest follows Docker within moments
                    expected = views["runc"][len(views[runtime])]
                    view = poll(lambda: network_view(container_name),
                                lambda seen: seen == expected, 60, interval=0.5)
                views[runtime].append(view)
                if step == steps[1]:        # both networks attached: a peer reaches us
                    out = sh("docker", "exec", peer, "sh", "-c",
                             HTTP_GET.format(ip="10.125.47.40"), check=False)
                    assert out.stdout.strip() == f"hot-{runtime}", (runtime, out)
        for runc_view, dkvm_view in zip(views["runc"], views["dkvm"]):
            assert dkvm_view == runc_view, "\n".join(map(repr, (dkvm_view, runc_view)))
        assert "eth1" in str(views["dkvm"][1]) and "default via 10.125.47.1 dev eth1" in \
            views["dkvm"][1][0]
        assert "fd00:dcba:1::40/64" in str(views["dkvm"][2])
        assert sh("docker", "inspect", "-f", "{{.State.Running}}", container_name
                  ).stdout.strip() == "true"
        assert dkvm_lines(sh("docker", "logs", container_name).stderr) == []
    finally:
        sh("docker", "rm", "-f", peer, container_name, check=False)
