"""What `dkvm install` writes where Docker, Podman and containerd look for runtimes
(daemon.json replaced whole, its mode, owner and the rest of it kept), and that
`uninstall` gives back exactly what was there."""
import json
import os
import stat
import tomllib

import pytest

from unitutil import CONTAINERD_CONFIG
from dkvm.errors import DkvmError
from dkvm.host import registrations
from dkvm.host.registrations import (ContainerdRegistration, DockerRegistration,
                                     PodmanRegistration, choose_engines, replace_file)

RUNTIME = "/usr/local/bin/dkvm-runtime"


def test_containerd_registration_backs_up_and_uninstall_restores(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text(CONTAINERD_CONFIG)
    monkeypatch.setattr(ContainerdRegistration, "config", str(config))
    engine = ContainerdRegistration()
    assert "restart containerd" in engine.register(RUNTIME, "/usr/sbin/runc")
    assert (tmp_path / "config.toml.dkvm-backup").read_text() == CONTAINERD_CONFIG
    engine.unregister()
    assert config.read_text() == CONTAINERD_CONFIG
    config.unlink()
    engine.register(RUNTIME, "/usr/sbin/runc")                 # no file: one is created
    engine.unregister()
    assert not config.exists()


def test_podman_drop_in_is_written_and_a_users_file_of_that_name_comes_back(tmp_path,
                                                                          monkeypatch):
    drop_in = tmp_path / "containers.conf.d" / "dkvm.conf"
    monkeypatch.setattr(PodmanRegistration, "drop_in", str(drop_in))
    engine = PodmanRegistration()
    engine.register(RUNTIME, "/usr/sbin/runc")
    assert tomllib.loads(drop_in.read_text()) == {"engine": {"runtimes": {"dkvm": [RUNTIME]}}}
    engine.unregister()
    assert not drop_in.exists()
    drop_in.write_text("# the user's own\n")
    engine.register(RUNTIME, "/usr/sbin/runc")
    engine.register(RUNTIME, "/usr/sbin/runc")                 # twice: the backup stays theirs
    engine.unregister()
    assert drop_in.read_text() == "# the user's own\n"
    assert sorted(p.name for p in drop_in.parent.iterdir()) == ["dkvm.conf"]


def test_engines_are_chosen_by_name_or_found_on_the_host(monkeypatch):
    assert [e.name for e in choose_engines(["podman,containerd", "podman"])] == \
        ["podman", "containerd"]
    with pytest.raises(DkvmError, match="--engine cri-o: not an engine dkvm knows"):
        choose_engines(["cri-o"])
    for engine in registrations.ENGINES.values():
        monkeypatch.setattr(engine, "present", lambda name=engine.name: name != "podman")
    assert [e.name for e in choose_engines([])] == ["docker", "containerd"]


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
