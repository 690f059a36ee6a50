"""Files of a tree that is not ours (boot/rooted.py): nothing but a regular file is ever
opened, a node's type is known before anything opens it, and a path is resolved inside
the tree whatever its links (a hostile image's links stay inside it)."""
import os
import stat

import pytest

from unitutil import OpenWatch
from dkvm.boot.rooted import (open_in_root, open_or_create_regular, open_regular, read_file,
                              read_head)


@pytest.mark.parametrize("path,reason", [("/vmlinuz", "not a regular file"),
                                         ("/boot/vmlinuz", "not a regular file"),
                                         ("/boot/vmlinuz-9", "No such file|link to nothing")])
def test_rooted_readers_never_open_a_fifo_a_device_or_a_file_outside(hostile, path, reason):
    root, nodes = hostile
    with OpenWatch(*nodes) as watch:
        for call in (lambda: open_regular(root, path, 1 << 20),
                     lambda: read_head(root, path, 64),
                     lambda: read_file(root, path, 1 << 20),
                     lambda: open_or_create_regular(root, path, 0o600),
                     lambda: open_regular(root, path, 1 << 20, os.O_RDWR)):
            with pytest.raises(OSError, match=reason):
                call()
        assert not watch.opened()


def test_a_regular_file_is_reopened_by_its_inode_with_the_flags_asked(tmp_path):
    (tmp_path / "data").write_bytes(b"abc")
    fd = open_regular(tmp_path, "/data", 16, os.O_RDWR)
    try:
        os.write(fd, b"x")
        assert os.fstat(fd).st_ino == os.stat(tmp_path / "data").st_ino
    finally:
        os.close(fd)
    assert read_file(tmp_path, "/data", 16) == b"xbc"
    with pytest.raises(OSError, match="larger than"):
        read_file(tmp_path, "/data", 2)
    fd = open_or_create_regular(tmp_path, "/new", 0o600)
    os.close(fd)
    assert stat.S_ISREG(os.lstat(tmp_path / "new").st_mode)
    os.symlink("/../../new", tmp_path / "link")           # resolves inside the tree
    fd = open_or_create_regular(tmp_path, "/link", 0o600)
    try:
        assert os.fstat(fd).st_ino == os.stat(tmp_path / "new").st_ino
    finally:
        os.close(fd)


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
