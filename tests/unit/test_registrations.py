"""What `dkvm install` writes where Podman and containerd look for runtimes, and that
`uninstall` gives back exactly what was there."""
import tomllib

import pytest

from unitutil import CONTAINERD_CONFIG
from dkvm.errors import DkvmError
from dkvm.host import registrations
from dkvm.host.registrations import ContainerdRegistration, PodmanRegistration, choose_engines

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
