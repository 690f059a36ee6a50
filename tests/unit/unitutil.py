"""Shared helpers for the unit tests: the captured dockerd configs and a rewrite
wrapper that returns the new config together with its decoded plan."""
import json
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dkvm.plan import PLAN_ENV, Plan  # noqa: E402
from dkvm.rewrite import HostFacts, rewrite_create_config  # noqa: E402

FIXTURE_NAMES = ["plain", "user-workdir-env", "resources-tmpfs-volume", "tty-init",
                 "privileged-cpuset"]
KERNELS = {"debian": "6.1.0-28-amd64"}
PAYLOAD_DIR = "/var/lib/dkvm/0123456789abcdef"


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


def rewrite(config, **kw):
    new = rewrite_create_config(config, facts(**kw))
    return new, plan_of(new)


def with_env(config, *items):
    """A copy of `config` whose process env has `items` appended."""
    config = json.loads(json.dumps(config))
    config["process"]["env"] = list(config["process"]["env"]) + list(items)
    return config
