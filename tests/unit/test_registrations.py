"""What `dkvm install` writes where Podman and containerd look for runtimes, and that
`uninstall` gives back exactly what was there."""
import tomllib

import pytest

from dkvm.errors import DkvmError
from dkvm.host import registrations
from dkvm.host.engine_toml import (add_containerd_runtime, containerd_runtime_section,
                                   remove_containerd_runtime)
from dkvm.host.registrations import ContainerdRegistration, PodmanRegistration, choose_engines

RUNTIME = "/usr/local/bin/dkvm-runtime"
DEBIAN = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""


@pytest.mark.parametrize("version, table", [
    ("", ["plugins", "cri", "containerd", "runtimes"]),
    ("version = 2\n", ["plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes"]),
    ("version = 3\n", ["plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes"]),
])
def test_the_runtime_class_goes_where_each_config_version_has_it(version, table):
    text = add_containerd_runtime(version + "# a comment of the user's\n", RUNTIME)
    node = tomllib.loads(text)
    for key in table:
        node = node[key]
    assert node["dkvm"] == {"runtime_type": "io.containerd.runc.v2",
                            "options": {"BinaryName": RUNTIME}}
    assert remove_containerd_runtime(text) == version + "# a comment of the user's\n"


def test_debians_config_keeps_every_byte_and_a_second_install_changes_nothing():
    once = add_containerd_runtime(DEBIAN, RUNTIME)
    assert once.startswith(DEBIAN)
    assert tomllib.loads(once)["plugins"]["io.containerd.grpc.v1.cri"]["cni"]["bin_dir"] \
        == "/usr/lib/cni"
    assert add_containerd_runtime(once, RUNTIME) == once
    assert remove_containerd_runtime(once) == DEBIAN


def test_a_config_dkvm_created_is_removed_whole():
    text = add_containerd_runtime(None, RUNTIME)
    assert containerd_runtime_section(text)["options"]["BinaryName"] == RUNTIME
    assert remove_containerd_runtime(text) is None


@pytest.mark.parametrize("text, message", [
    ("version = 2\n[plugins\n", "is not valid TOML"),
    ("version = 9\n", "config version 9 is not known"),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.dkvm]\n'
     'runtime_type = "x"\n', "already has a runtime named 'dkvm' that dkvm did not write"),
    # an inline table cannot be extended by a later header: the result would not parse
    ('version = 2\nplugins = {}\n', "would not give containerd a valid config"),
])
def test_a_config_dkvm_cannot_edit_safely_is_refused_with_why(text, message):
    with pytest.raises(DkvmError, match=message):
        add_containerd_runtime(text, RUNTIME)


def test_containerd_registration_backs_up_and_uninstall_restores(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text(DEBIAN)
    monkeypatch.setattr(ContainerdRegistration, "config", str(config))
    engine = ContainerdRegistration()
    assert "restart containerd" in engine.register(RUNTIME, "/usr/sbin/runc")
    assert (tmp_path / "config.toml.dkvm-backup").read_text() == DEBIAN
    engine.unregister()
    assert config.read_text() == DEBIAN
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


def test_a_path_toml_cannot_hold_plainly_is_refused():
    with pytest.raises(DkvmError, match="cannot be registered"):
        add_containerd_runtime(DEBIAN, '/opt/"odd"/dkvm-runtime')


def test_runc_stays_the_default_runtime_and_a_systemd_cgroup_driver_is_followed():
    # a runtimes table replaces containerd's built-in one: runc must be named too
    runtimes = tomllib.loads(add_containerd_runtime(DEBIAN, RUNTIME))["plugins"][
        "io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert runtimes["runc"] == {"runtime_type": "io.containerd.runc.v2"}
    kubelet = DEBIAN + ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
                        '  runtime_type = "io.containerd.runc.v2"\n'
                        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
                        '  SystemdCgroup = true\n')
    text = add_containerd_runtime(kubelet, RUNTIME)
    assert containerd_runtime_section(text)["options"] == {"BinaryName": RUNTIME,
                                                          "SystemdCgroup": True}
    assert text.count("runtimes.runc]") == 1
