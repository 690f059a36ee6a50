"""Shared helpers for the unit tests: the captured dockerd configs and a rewrite
wrapper that returns the new config together with its decoded plan."""
import json
from pathlib import Path

from dkvm.host.bundle import BundleLayout
from dkvm.host.facts import HostFacts
from dkvm.host.rewrite import rewrite_create_config
from dkvm.paths import PLAN_ENV
from dkvm.schema import Boot, Plan

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"

FIXTURE_NAMES = ["plain", "user-workdir-env", "resources-tmpfs-volume", "tty-init",
                 "privileged-cpuset", "flags", "cap-drop-all"]
KERNELS = {"debian": Boot(name="debian", release="6.1.0-28-amd64",
                          kernel="/.dkvm/kernels/debian/vmlinux",
                          initrd="/.dkvm/kernels/debian/initrd.img",
                          modules="/.dkvm/kernels/debian/lib/modules"),
           "dkvm": Boot(name="dkvm", release="6.1.192-dkvm",
                        kernel="/.dkvm/kernels/dkvm/vmlinux",
                        modules="/.dkvm/kernels/dkvm/lib/modules")}
PAYLOAD_DIR = "/var/lib/dkvm/0123456789abcdef"
CONTAINER_ID = "0123456789abcdef0123456789abcdef"
BUNDLE = "/run/containerd/io.containerd.runtime.v2.task/moby/" + CONTAINER_ID


def load_config(name):
    return json.loads((FIXTURES / f"config-{name}.json").read_text())


def facts(kvm_usable=False, defaults=None, kernels=None):
    return HostFacts(payload_dir=PAYLOAD_DIR, kvm_usable=kvm_usable,
                     kernels=dict(KERNELS if kernels is None else kernels),
                     defaults=dict(defaults or {}))


def plan_of(config):
    """The Plan carried in the rewritten config's DKVM_PLAN env entry (exactly one)."""
    entries = [e for e in config["process"]["env"] if e.startswith(PLAN_ENV + "=")]
    assert len(entries) == 1, config["process"]["env"]
    return Plan.from_json(entries[0][len(PLAN_ENV) + 1:])


def layout(config):
    """The captured configs' image roots are not on this machine: every destination
    resolves as written."""
    return BundleLayout(BUNDLE, config)


def rewrite(config, **kw):
    new = rewrite_create_config(config, facts(**kw), layout(config), CONTAINER_ID)
    return new, plan_of(new)


def with_env(config, *items):
    """A copy of `config` whose process env has `items` appended."""
    config = json.loads(json.dumps(config))
    config["process"]["env"] = list(config["process"]["env"]) + list(items)
    return config
