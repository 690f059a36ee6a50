"""What DKVM writes on the host: daemon.json replaced whole (mode, owner and the rest
of it kept), and payloads removed only when no running container uses them."""
import json
import os
import stat
from pathlib import Path

import pytest

from unitutil import OpenWatch
from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.host import install, payload
from dkvm.host.registrations import DockerRegistration, replace_file


def test_replace_file_keeps_mode_and_owner_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "daemon.json"
    target.write_text("{}\n")
    os.chmod(target, 0o600)
    if os.geteuid() == 0:
        os.chown(target, 1234, 5678)
    before = os.stat(target)
    replace_file(str(target), '{"a": 1}\n', like=str(target))
    after = os.stat(target)
    assert target.read_text() == '{"a": 1}\n'
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert [p.name for p in tmp_path.iterdir()] == ["daemon.json"]


def test_replace_file_that_fails_leaves_the_original(tmp_path, monkeypatch):
    target = tmp_path / "daemon.json"
    target.write_text("original\n")

    def fail(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        replace_file(str(target), "new\n", like=str(target))
    assert target.read_text() == "original\n"
    assert [p.name for p in tmp_path.iterdir()] == ["daemon.json"]


def test_registering_keeps_the_rest_of_daemon_json_and_backs_it_up(tmp_path):
    docker = DockerRegistration()
    docker.daemon_json = str(tmp_path / "daemon.json")
    docker.pidfile = str(tmp_path / "no-dockerd.pid")
    (tmp_path / "daemon.json").write_text('{"labels": ["kept"]}')
    assert "dockerd is not running" in docker.register("/usr/local/bin/dkvm-runtime",
                                                        "/usr/sbin/runc")
    cfg = json.loads((tmp_path / "daemon.json").read_text())
    assert cfg == {"labels": ["kept"], "runtimes": {"dkvm": {
        "path": "/usr/local/bin/dkvm-runtime", "runtimeArgs": ["--dkvm-runc=/usr/sbin/runc"]}}}
    assert (tmp_path / "daemon.json.dkvm-backup").read_text() == '{"labels": ["kept"]}'


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "HOST_STATE_DIR", str(tmp_path / "dkvm"))
    for build in ("old", "running", "current"):
        (tmp_path / "dkvm" / build / "qemu").mkdir(parents=True)
        os.chmod(tmp_path / "dkvm" / build / "qemu", 0o555)     # payloads are read-only
    (tmp_path / "dkvm" / ".lock").write_text("")
    monkeypatch.setattr(payload, "payloads_in_use", lambda: {"running"})
    return tmp_path / "dkvm"


def test_prune_keeps_the_current_payload_and_those_in_use(state_dir):
    assert payload.prune_payloads(keep="current") == (["old"], ["running"])
    assert sorted(p.name for p in state_dir.iterdir()) == [".lock", "current", "running"]


def test_uninstall_keeps_a_payload_a_running_container_uses(state_dir, tmp_path, capsys,
                                                           monkeypatch):
    class Engine:
        def unregister(self):
            return "unregistered"
    install.uninstall(str(tmp_path / "bin"), [Engine()])
    assert sorted(p.name for p in state_dir.iterdir()) == [".lock", "running"]
    assert "kept 1 payload(s)" in capsys.readouterr().out
    monkeypatch.setattr(payload, "payloads_in_use", set)       # the container is gone
    install.uninstall(str(tmp_path / "bin"), [Engine()])
    assert not state_dir.exists()


def test_every_test_the_readmes_flag_table_names_exists():
    """The flag table says how each row is tested: each test it names is real."""
    import re
    repo = Path(__file__).resolve().parents[2]
    table = (repo / "README.md").read_text().split("## docker run flags and signals", 1)[1]
    table = table.split("\n## ", 1)[0]
    named = set(re.findall(r"`(?:[\w.]+::)?(test_\w+)`", table))
    defined = set()
    for path in (repo / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    assert len(named) >= 12
    assert named <= defined, sorted(named - defined)


def archive_with_payload(path, members):
    """An archive like build.py's: the payload as one tar member, its build id beside."""
    import io
    import tarfile
    import zipfile
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, mode, content in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(payload.PAYLOAD_MEMBER, data.getvalue())
        zf.writestr(payload.PAYLOAD_BUILD_ID, "0123456789abcdef\n")


def test_the_payload_unpacks_read_only_with_its_modes(tmp_path):
    import zipfile
    archive = tmp_path / "dkvm.pyz"
    archive_with_payload(archive, [("bin", 0o755, None), ("bin/tool", 0o755, b"#!x"),
                                   ("lib/libx.so", 0o644, b"\0" * 10)])
    dest = tmp_path / "out"
    dest.mkdir()
    with zipfile.ZipFile(archive) as zf:
        payload.extract_payload(zf, str(dest))
    assert (dest / "bin" / "tool").read_bytes() == b"#!x"
    assert stat.S_IMODE(os.stat(dest / "bin" / "tool").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(dest / "lib" / "libx.so").st_mode) == 0o444
    assert payload.build_id(str(archive)) == "0123456789abcdef"


@pytest.mark.parametrize("name", ["../escaped", "/etc/escaped", "bin/../../escaped"])
def test_a_payload_member_outside_the_payload_is_refused(tmp_path, name):
    import zipfile
    archive = tmp_path / "dkvm.pyz"
    archive_with_payload(archive, [(name, 0o644, b"x")])
    dest = tmp_path / "deep" / "out"
    dest.mkdir(parents=True)
    with zipfile.ZipFile(archive) as zf, pytest.raises(DkvmError, match="not a payload"):
        payload.extract_payload(zf, str(dest))
    assert not list(tmp_path.rglob("escaped"))


# Files of a tree that is not ours (dkvm.boot.rooted): nothing but a regular file is ever
# opened, and a node's type is known before anything opens it.

def hostile_tree(root):
    """/vmlinuz a FIFO, /boot/vmlinuz a device node, /boot/vmlinuz-9 a link out of the
    tree to a real kernel-like file on the host; each FIFO has a reader ready, so that
    an open would return, not hang, and be seen."""
    (root / "boot").mkdir(parents=True)
    os.mkfifo(root / "vmlinuz")
    os.mknod(root / "boot/vmlinuz", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    host_file = root.parent / "host-kernel"
    host_file.write_bytes(b"HdrS" * 1024)
    os.symlink(host_file, root / "boot/vmlinuz-9")
    return [root / "vmlinuz", root / "boot/vmlinuz", host_file]


@pytest.fixture
def hostile(tmp_path):
    root = tmp_path / "image"
    nodes = hostile_tree(root)
    reader = os.open(root / "vmlinuz", os.O_RDONLY | os.O_NONBLOCK)
    yield root, nodes
    os.close(reader)


@pytest.mark.parametrize("path,reason", [("/vmlinuz", "not a regular file"),
                                         ("/boot/vmlinuz", "not a regular file"),
                                         ("/boot/vmlinuz-9", "No such file|link to nothing")])
def test_rooted_readers_never_open_a_fifo_a_device_or_a_file_outside(hostile, path, reason):
    from dkvm.boot.rooted import open_or_create_regular, open_regular, read_file, read_head
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


def test_the_image_kernel_search_opens_no_fifo_device_or_file_outside(hostile):
    from dkvm.boot.image_kernel import find_kernel, open_kernel
    root, nodes = hostile
    with OpenWatch(*nodes) as watch:
        with pytest.raises(DkvmError, match="the image has no kernel"):
            find_kernel(str(root))
        with pytest.raises(DkvmError, match="cannot open the image's /vmlinuz: not a regular"):
            open_kernel(str(root), "/vmlinuz", "6.1.0")
        assert not watch.opened()


def test_a_regular_file_is_reopened_by_its_inode_with_the_flags_asked(tmp_path):
    from dkvm.boot.rooted import open_or_create_regular, open_regular, read_file
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
