"""container.pod_volumes: a pod's volumes, each one export, by their directories'
identity (real directories and a read-only bind of one, in a mount namespace of
this test's own where it can make one)."""
import os
import subprocess
import sys

from dkvm.container.pod_volumes import PodVolumes


def path_fd(path):
    return os.open(path, os.O_PATH | os.O_DIRECTORY)


def test_a_volume_is_known_by_its_directory_whoever_sends_it(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    volumes = PodVolumes()
    tags, new, waits = volumes.claim(1, [path_fd(tmp_path / "a"), path_fd(tmp_path / "b")])
    assert tags == ["v0", "v1"] and [tag for tag, _ in new] == ["v0", "v1"]
    assert waits == {"v0", "v1"}
    for _, fd in new:
        os.close(fd)
    # the same directory by another path (a link) from another member: the same export
    os.symlink(tmp_path / "a", tmp_path / "link")
    tags, new, waits = volumes.claim(2, [path_fd(tmp_path / "link")])
    assert (tags, new, waits) == (["v0"], [], {"v0"})
    assert volumes.on_plugged("v0", "") == ([1, 2], False)
    assert volumes.on_plugged("v1", "") == ([1], False)
    assert volumes.claim(3, [path_fd(tmp_path / "a")])[2] == set()     # plugged: no wait
    # released by every member that used it, it is unplugged; never a tag twice
    assert volumes.release(1) == ["v1"]
    assert volumes.release(2) == []
    assert volumes.release(3) == ["v0"]
    (tmp_path / "c").mkdir()
    tags, new, _ = volumes.claim(4, [path_fd(tmp_path / "c")])
    assert tags == ["v2"]
    os.close(new[0][1])


def test_a_plug_that_failed_or_is_no_longer_wanted(tmp_path):
    (tmp_path / "a").mkdir()
    volumes = PodVolumes()
    _, new, _ = volumes.claim(1, [path_fd(tmp_path / "a")])
    os.close(new[0][1])
    assert volumes.on_plugged("v0", "no slot") == ([1], False)
    assert volumes.release(1) == []
    # a member gone before its volume's plug is done: unplugged as it comes
    _, new, _ = volumes.claim(2, [path_fd(tmp_path / "a")])
    os.close(new[0][1])
    assert new[0][0] == "v1" and volumes.release(2) == []
    assert volumes.on_plugged("v1", "") == ([], True)
    assert volumes.on_plugged("v9", "") == ([], False)


IN_NAMESPACE = """
import os, sys
sys.path.insert(0, sys.argv[1])
from dkvm.container.pod_volumes import PodVolumes
os.makedirs(sys.argv[2] + "/ro", exist_ok=True)
assert os.system(f"mount --bind {sys.argv[2]}/dir {sys.argv[2]}/ro && "
                 f"mount -o remount,bind,ro {sys.argv[2]}/ro") == 0
volumes = PodVolumes()
fds = [os.open(sys.argv[2] + name, os.O_PATH | os.O_DIRECTORY) for name in ("/dir", "/ro")]
print(volumes.claim(1, fds)[0])
"""


def test_a_read_only_mount_of_a_volume_is_another_export(tmp_path):
    """A member mounting a volume read-only, another writable: each gets its own."""
    from unitutil import REPO
    (tmp_path / "dir").mkdir()
    out = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                          IN_NAMESPACE, str(REPO), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['v0', 'v1']"
