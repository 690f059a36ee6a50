"""What the engine's network namespace means at create: one made for the container
(by runc, or by the engine under /run/netns) is the VM's; the host's and another
container's are refused."""
import pytest

from dkvm.errors import DkvmError
from dkvm.host import engines
from dkvm.host.engines import DOCKER, is_own_namespace


def linux_with(*namespaces):
    return {"namespaces": [{"type": "pid"}, *namespaces]}


@pytest.mark.parametrize("netns", [
    {"type": "network"},                                   # dockerd: runc makes it
    {"type": "network", "path": "/run/netns/cni-1234"},    # Podman, CRI
    {"type": "network", "path": "/var/run/netns/mine"},    # ctr --with-ns
])
def test_a_namespace_made_for_the_container_is_the_vms(netns):
    DOCKER.check_network_namespace(linux_with(netns))


@pytest.mark.parametrize("linux", [
    linux_with(),                                           # --network host
    linux_with({"type": "network", "path": "/var/run/docker/netns/default"}),
])
def test_the_hosts_namespace_is_refused(linux):
    with pytest.raises(DkvmError, match="--network host is not supported"):
        DOCKER.check_network_namespace(linux)


def test_a_run_netns_path_to_the_hosts_own_namespace_is_refused(monkeypatch):
    monkeypatch.setattr(engines, "is_own_namespace", lambda path: path == "/run/netns/host")
    with pytest.raises(DkvmError, match="--network host is not supported"):
        DOCKER.check_network_namespace(linux_with({"type": "network", "path": "/run/netns/host"}))


# PID 4242424 is past Linux's PID_MAX_LIMIT (2**22): no process of the machine running the
# tests has it, so its namespace is never the host's
@pytest.mark.parametrize("path", ["/proc/4242424/ns/net", "/run/netns/../../proc/4242424/ns/net",
                                  "/tmp/netns/x"])
def test_another_containers_namespace_is_refused(path):
    with pytest.raises(DkvmError, match="container:NAME is not supported.*must be in "
                                        "/run/netns or /var/run/netns"):
        DOCKER.check_network_namespace(linux_with({"type": "network", "path": path}))


def test_a_namespace_is_the_hosts_when_it_is_the_same_file(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text("")
    second.write_text("")
    assert is_own_namespace(str(first), own=str(first))
    assert not is_own_namespace(str(first), own=str(second))
    assert not is_own_namespace(str(tmp_path / "missing"), own=str(first))
    assert is_own_namespace("/proc/self/ns/net")


@pytest.mark.parametrize("path", ["/proc/4242424/ns/net", "/proc/4242424/ns/../ns/net"])
def test_a_pods_member_may_join_its_sandboxs_namespace(path):
    """CRI gives an app container its sandbox's namespace as /proc/PID/ns/net: a
    member (no VM, no interface taken) may join it."""
    linux = linux_with({"type": "network", "path": path})
    assert DOCKER.check_network_namespace(linux, joins_pod=True) == "/proc/4242424/ns/net"


@pytest.mark.parametrize("linux", [
    linux_with(),
    linux_with({"type": "network", "path": "/var/run/docker/netns/default"}),
    linux_with({"type": "network", "path": "/proc/self/ns/net"}),
    linux_with({"type": "network", "path": "/proc/1/ns/../../1/root/x/ns/net"}),
])
def test_a_member_still_gets_no_host_namespace(linux, monkeypatch):
    monkeypatch.setattr(engines, "is_own_namespace", lambda path: path == "/proc/1/ns/net"
                        or path.startswith("/proc/self/"))
    with pytest.raises(DkvmError, match="not supported"):
        DOCKER.check_network_namespace(linux, joins_pod=True)


@pytest.mark.parametrize("path, answer", [
    ("/proc/4242424/ns/net", True), ("/proc/self/ns/net", False), ("/proc/42/ns/ipc", False),
    ("/proc/42/task/42/ns/net", False), ("/run/netns/cni-1", False), ("/proc/٤٢/ns/net", False),
])
def test_a_process_namespace_path(path, answer):
    assert engines.is_process_namespace(path) is answer
