"""Payloads on the host (host/payload.py): one unpacked read-only with its modes, a member
outside it refused, and old ones removed only when no running container uses them (by
prune, and by uninstall's prune)."""
import os
import stat

import pytest

from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.host import install, payload


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
