"""DKVM_DISKS: the option, the plan's disks, and the container side opening a backing
file inside the image's tree (a hostile image's links stay inside it)."""
import os
import stat

import pytest

from unitutil import load_config, rewrite, with_env
from dkvm.boot.rooted import open_in_root
from dkvm.errors import DkvmError
from dkvm.host.settings import Disks
from dkvm.schema import Disk


def test_disks_go_to_the_plan_with_a_serial_each():
    config = with_env(load_config("plain"), "DKVM_DISKS=/d/a.img,/var/lib/docker,ext4,1g; "
                      "/b.img,/srv/,ext2,64m")
    _, plan = rewrite(config)
    assert plan.disks == [
        Disk(file="/d/a.img", mount_point="/var/lib/docker", filesystem="ext4", size=1 << 30,
             serial="dkvm-disk0"),
        Disk(file="/b.img", mount_point="/srv", filesystem="ext2", size=64 << 20,
             serial="dkvm-disk1")]
    assert rewrite(load_config("plain"))[1].disks == []


def test_the_option_reads_its_text_once_into_the_plans_records():
    disks = Disks().parse("DKVM_DISKS", " /a.img , /data/ ,ext4, 1G ;;", None)
    assert disks == [Disk(file="/a.img", mount_point="/data", filesystem="ext4", size=1 << 30)]
    assert Disks().show(disks) == "/a.img,/data,ext4,1g"
    assert Disks().parse("DKVM_DISKS", Disks().show(disks), None) == disks


def test_the_plan_carries_each_disk_once_as_a_record():
    """DKVM_DISKS is read once, into the records the plan carries: not also as text in
    the plan's options."""
    config = with_env(load_config("plain"), "DKVM_DISKS=/a.img,/data,ext4,64m")
    _, plan = rewrite(config)
    assert plan.to_json().count("/a.img") == 1
    assert not [name for name in plan.options.as_dict() if "disk" in name]


@pytest.mark.parametrize("where,mount,readonly,error", [
    ("/d.img", None, True, "on a read-only path"),
    ("/vol/d.img", {"destination": "/vol", "type": "bind", "source": "/x",
                    "options": ["rbind", "ro"]}, False, "on a read-only path"),
    ("/vol/d.img", {"destination": "/vol", "type": "bind", "source": "/x",
                    "options": ["rbind", "rw"]}, True, None),
    ("/scratch/d.img", {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
                        "options": []}, False, "on a --tmpfs"),
])
def test_a_backing_file_must_be_where_the_container_side_can_write(where, mount, readonly,
                                                                    error):
    config = with_env(load_config("plain"), f"DKVM_DISKS={where},/data,ext4,64m")
    config["root"]["readonly"] = readonly
    if mount:
        config["mounts"].append(mount)
    if error:
        with pytest.raises(DkvmError, match=f"DKVM_DISKS: the file {where} is {error}"):
            rewrite(config)
    else:
        assert [d.file for d in rewrite(config)[1].disks] == [where]


def test_a_backing_file_is_opened_inside_the_images_tree_whatever_its_links(tmp_path):
    """An image whose /disks is a link to the container side's /run, or whose file is
    a link to /etc/shadow, still gets its file made inside its own tree."""
    image = tmp_path / "image"
    (image / "run").mkdir(parents=True)
    (image / "etc").mkdir()
    os.symlink("/run", image / "disks")
    os.symlink("/etc/dkvm-test-target", image / "file.img")
    outside = tmp_path / "outside"
    for path, link in (("/disks/d.img", image / "run" / "d.img"),
                       ("/file.img", image / "etc" / "dkvm-test-target"),
                       ("/../../../d2.img", image / "d2.img")):
        fd = open_in_root(str(image), path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        assert stat.S_ISREG(os.stat(link).st_mode), path
    assert not outside.exists() and not os.path.exists("/etc/dkvm-test-target")
    with pytest.raises(FileNotFoundError):
        open_in_root(str(image), "/no/such/dir/d.img", os.O_RDWR | os.O_CREAT, 0o600)
