"""containerd's runtime class in its config.toml (host.engine_toml): added where each
config version has it, the user's bytes kept, removed exactly; text in, text out."""
import tomllib

import pytest

from unitutil import CONTAINERD_CONFIG
from dkvm.errors import DkvmError
from dkvm.host.engine_toml import (add_containerd_runtime, containerd_runtime_section,
                                   remove_containerd_runtime)

RUNTIME = "/usr/local/bin/dkvm-runtime"


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
    once = add_containerd_runtime(CONTAINERD_CONFIG, RUNTIME)
    assert once.startswith(CONTAINERD_CONFIG)
    assert tomllib.loads(once)["plugins"]["io.containerd.grpc.v1.cri"]["cni"]["bin_dir"] \
        == "/usr/lib/cni"
    assert add_containerd_runtime(once, RUNTIME) == once
    assert remove_containerd_runtime(once) == CONTAINERD_CONFIG


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


def test_a_path_toml_cannot_hold_plainly_is_refused():
    with pytest.raises(DkvmError, match="cannot be registered"):
        add_containerd_runtime(CONTAINERD_CONFIG, '/opt/"odd"/dkvm-runtime')


def test_runc_stays_the_default_runtime_and_a_systemd_cgroup_driver_is_followed():
    # a runtimes table replaces containerd's built-in one: runc must be named too
    runtimes = tomllib.loads(add_containerd_runtime(CONTAINERD_CONFIG, RUNTIME))["plugins"][
        "io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert runtimes["runc"] == {"runtime_type": "io.containerd.runc.v2"}
    kubelet = CONTAINERD_CONFIG + ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
                        '  runtime_type = "io.containerd.runc.v2"\n'
                        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
                        '  SystemdCgroup = true\n')
    text = add_containerd_runtime(kubelet, RUNTIME)
    assert containerd_runtime_section(text)["options"] == {"BinaryName": RUNTIME,
                                                          "SystemdCgroup": True}
    assert text.count("runtimes.runc]") == 1
