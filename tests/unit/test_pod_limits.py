"""host.pod_limits: a pod's sandbox takes its pod's cgroup limits, read from a cgroup
tree (here one made in a temporary directory, v1 and v2, as the kubelet leaves it)."""
import pytest

from dkvm.host.pod_limits import pod_cgroup, read_pod_limits, slice_path, with_pod_limits

SANDBOX = "0123abcd"


@pytest.mark.parametrize("cgroups_path, pod", [
    (f"/kubepods/burstable/pod42/{SANDBOX}", "/kubepods/burstable/pod42"),
    (f"/kubepods/pod42/{SANDBOX}", "/kubepods/pod42"),
    (f"kubepods-burstable-pod42.slice:cri-containerd:{SANDBOX}",
     "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod42.slice"),
    (f"/{SANDBOX}", ""),                        # no parent: nothing to read
    (f"/kubepods/../etc/{SANDBOX}", ""),        # never a path out of the tree
    (f"kubepods/pod42/{SANDBOX}", ""),
    (f"-.slice:cri-containerd:{SANDBOX}", ""),
    (f"../x.slice:cri-containerd:{SANDBOX}", ""),
    ("", ""), (None, ""),
])
def test_the_pods_cgroup_is_the_sandboxs_parent(cgroups_path, pod):
    assert pod_cgroup(cgroups_path) == pod


def test_a_slices_path_nests_its_prefixes():
    assert slice_path("a.slice") == "/a.slice"
    assert slice_path("a-b-c.slice") == "/a.slice/a-b.slice/a-b-c.slice"
    assert slice_path("a--b.slice") == "" and slice_path("a.scope") == ""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v1_limits_are_read_from_the_memory_and_cpu_hierarchies(tmp_path):
    pod = "kubepods/burstable/pod42"
    write(tmp_path / "memory" / pod / "memory.limit_in_bytes", "536870912\n")
    write(tmp_path / "cpu" / pod / "cpu.cfs_quota_us", "150000\n")
    write(tmp_path / "cpu" / pod / "cpu.cfs_period_us", "100000\n")
    assert read_pod_limits(f"/{pod}/{SANDBOX}", root=str(tmp_path)) == {
        "memory": {"limit": 536870912}, "cpu": {"quota": 150000, "period": 100000}}
    # unlimited, as the kubelet leaves a pod whose containers set no limit
    write(tmp_path / "memory" / pod / "memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path / "cpu" / pod / "cpu.cfs_quota_us", "-1\n")
    assert read_pod_limits(f"/{pod}/{SANDBOX}", root=str(tmp_path)) == {}


def test_cgroup_v2_limits_are_read_from_the_pods_directory(tmp_path):
    pod = "kubepods.slice/kubepods-pod42.slice"
    write(tmp_path / pod / "memory.max", "268435456\n")
    write(tmp_path / pod / "cpu.max", "200000 100000\n")
    assert read_pod_limits(f"kubepods-pod42.slice:cri-containerd:{SANDBOX}",
                           root=str(tmp_path)) == {
        "memory": {"limit": 268435456}, "cpu": {"quota": 200000, "period": 100000}}
    write(tmp_path / pod / "memory.max", "max\n")
    write(tmp_path / pod / "cpu.max", "max 100000\n")
    assert read_pod_limits(f"kubepods-pod42.slice:cri-containerd:{SANDBOX}",
                           root=str(tmp_path)) == {}


def test_a_missing_cgroup_has_no_limits(tmp_path):
    (tmp_path / "memory").mkdir()
    assert read_pod_limits(f"/kubepods/pod42/{SANDBOX}", root=str(tmp_path)) == {}


def test_the_sandbox_takes_the_pods_limits_only_where_it_has_none():
    limits = {"memory": {"limit": 512 << 20}, "cpu": {"quota": 50000, "period": 100000}}
    bare = {"linux": {"resources": {"cpu": {"shares": 2}}}, "root": {"path": "rootfs"}}
    taken = with_pod_limits(bare, limits)
    assert taken["linux"]["resources"] == {
        "cpu": {"shares": 2, "quota": 50000, "period": 100000},
        "memory": {"limit": 512 << 20}}
    assert bare == {"linux": {"resources": {"cpu": {"shares": 2}}}, "root": {"path": "rootfs"}}
    own = {"linux": {"resources": {"memory": {"limit": 300 << 20}}}}
    assert with_pod_limits(own, limits)["linux"]["resources"]["memory"] == {"limit": 300 << 20}
    assert with_pod_limits(bare, {}) is bare
