import json
import os
from pathlib import Path

import pytest

from harness import guest, mux  # noqa: F401 (fixtures, shared by the control channel's tests)
from unitutil import FIXTURE_NAMES, KERNELS, Exec, hostile_tree, load_config


@pytest.fixture(params=FIXTURE_NAMES)
def any_config(request):
    return request.param, load_config(request.param)


@pytest.fixture(autouse=True)
def log_context():
    """Log lines name the role and container; each test starts with neither set and
    may set them (dkvm.log keeps them per process)."""
    from dkvm import log
    log.set_role("")
    log.set_container("")
    yield log
    log.set_role("")
    log.set_container("")


@pytest.fixture(autouse=True)
def policy_file(tmp_path, monkeypatch):
    """The host's policy file, for a test: never the real /etc/dkvm/policy.json."""
    from dkvm import paths
    path = tmp_path / "etc-dkvm" / "policy.json"
    monkeypatch.setattr(paths, "POLICY_FILE", str(path))
    return path


@pytest.fixture
def fake_host(monkeypatch):
    """The runtime on a host of the tests' making: its payload, no KVM, the unit tests'
    kernels, no VM template made (the templates it would have made are in the returned
    dict's "templates"), and runc not run: what it would have run (and, for `create`,
    the config it would have read) is in the returned dict; an execv of runc raises
    Exec."""
    from dkvm.host import facts, payload, templates
    from dkvm.roles import runtime
    calls = {}

    def execv(path, argv):
        calls["exec"] = (path, argv)
        raise Exec()

    def run_runc(path, args):
        calls["exec"] = (path, [path] + args)
        bundle = args[args.index("--bundle") + 1]
        calls["config"] = json.loads((Path(bundle) / "config.json").read_text())
        return 0

    monkeypatch.setattr(payload, "ensure_payload", lambda: "/var/lib/dkvm/feedface")
    monkeypatch.setattr(templates, "make_template", lambda payload_dir, spec, boot:
                        calls.setdefault("templates", []).append(spec.name))
    monkeypatch.setattr(facts, "kvm_usable", lambda: False)
    monkeypatch.setattr(payload, "payload_kernels", lambda d: dict(KERNELS))
    monkeypatch.setattr(facts, "find_runc", lambda explicit="": explicit or "/usr/bin/runc")
    monkeypatch.setattr(runtime.os, "execv", execv)
    monkeypatch.setattr(runtime, "run_runc", run_runc)
    return calls


@pytest.fixture
def hostile(tmp_path):
    """An image tree of nodes that must never be opened (unitutil.hostile_tree), with a
    reader on its FIFO: (root, the nodes)."""
    root = tmp_path / "image"
    nodes = hostile_tree(root)
    reader = os.open(root / "vmlinuz", os.O_RDONLY | os.O_NONBLOCK)
    yield root, nodes
    os.close(reader)
