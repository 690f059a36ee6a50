"""The host's policy file (host/policy.py): what it lets containers set, read only if it
is the operator's (root's, a regular file, no link, bounded), installed as a default
and removed only while it is one, shown by doctor in one line. What the permissions
guard, and how create enforces them, is in test_settings.py."""
import json
import os

import pytest

from dkvm.errors import DkvmError
from dkvm.host import install, policy
from dkvm.host.settings import parse_settings


def write(path, text, mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_no_policy_file_allows_nothing(policy_file):
    assert not policy_file.exists()
    assert policy.read_policy() == frozenset()


def test_the_policy_file_grants_what_it_names(policy_file):
    write(policy_file, json.dumps({"container_may_set": ["DKVM_SYS_ADMIN",
                                                         "DKVM_KERNEL=image"]}))
    assert policy.read_policy() == {"DKVM_SYS_ADMIN", "DKVM_KERNEL=image"}
    write(policy_file, policy.DEFAULT_TEXT)
    assert policy.read_policy() == frozenset()


@pytest.mark.parametrize("text,says", [
    ('{"container_may_set": ["DKVM_SYS_ADMN"]}', "DKVM_SYS_ADMN is not a permission"),
    ('{"container_may_set": ["DKVM_SYS_ADMIN"], "x": 1}', "unknown key"),
    ('{"container_may_set": "DKVM_SYS_ADMIN"}', "must be a list of names"),
    ('{"container_may_set": [1]}', "must be a list of names"),
    ('["DKVM_SYS_ADMIN"]', "unknown key"),
    ('{"container_may_set": [', "not valid JSON"),
    ('', "not valid JSON"),
    ('{"container_may_set": ["\\u001b[2J"]}', "is not a permission"),
])
def test_a_malformed_policy_is_one_line_naming_the_file(policy_file, text, says):
    write(policy_file, text)
    with pytest.raises(DkvmError) as info:
        policy.read_policy()
    msg = info.value.message
    assert msg.startswith(str(policy_file)) and says in msg and "\n" not in msg
    assert "\x1b" not in msg and "container_may_set" in msg and "DKVM_SYS_ADMIN" in msg


def test_only_the_operators_file_is_read(policy_file, tmp_path):
    target = write(tmp_path / "elsewhere.json", '{"container_may_set": ["DKVM_SYS_ADMIN"]}')
    policy_file.parent.mkdir(parents=True)
    policy_file.symlink_to(target)
    with pytest.raises(DkvmError, match="symbolic link"):
        policy.read_policy()
    policy_file.unlink()
    write(policy_file, '{"container_may_set": ["DKVM_SYS_ADMIN"]}', mode=0o666)
    with pytest.raises(DkvmError, match="owned by root and writable by no one else"):
        policy.read_policy()
    os.chmod(policy_file, 0o644)
    with pytest.raises(DkvmError, match="owned by root"):
        policy.read_policy(owner=os.getuid() + 1)
    policy_file.unlink()
    os.mkfifo(policy_file)                      # never blocks: not a regular file
    with pytest.raises(DkvmError, match="not a regular file"):
        policy.read_policy()
    policy_file.unlink()
    write(policy_file, " " * (policy.MAX_BYTES + 1))
    with pytest.raises(DkvmError, match="over 65536 bytes"):
        policy.read_policy()


def test_create_reads_the_policy_file(policy_file):
    from dkvm.host.facts import HostFacts
    write(policy_file, '{"container_may_set": ["DKVM_SYS_ADMIN"]}')
    allowed = policy.read_policy()
    values = parse_settings({"DKVM_SYS_ADMIN": "1"}, HostFacts("", False, {}), {}, allowed)
    assert values["sys_admin"] is True


def test_install_writes_the_default_and_keeps_the_operators(policy_file):
    assert "written" in policy.install_default()
    assert policy_file.read_text() == policy.DEFAULT_TEXT
    assert oct(policy_file.stat().st_mode & 0o777) == "0o644"
    assert policy.read_policy() == frozenset()
    write(policy_file, '{"container_may_set": ["DKVM_SYS_ADMIN"]}')
    assert "kept" in policy.install_default()
    assert policy.read_policy() == {"DKVM_SYS_ADMIN"}


def test_uninstall_removes_only_the_default(policy_file, tmp_path, capsys, monkeypatch):
    from dkvm import paths
    from dkvm.host import payload
    monkeypatch.setattr(paths, "HOST_STATE_DIR", str(tmp_path / "state"))  # not the host's
    monkeypatch.setattr(payload, "prune_payloads", lambda keep=None: ([], []))

    class Engine:
        def unregister(self):
            return "unregistered"
    write(policy_file, '{"container_may_set": ["DKVM_SYS_ADMIN"]}')
    install.uninstall(str(tmp_path / "bin"), [Engine()])
    assert policy_file.exists() and "kept" in capsys.readouterr().out
    write(policy_file, '{"container_may_set": []}')
    install.uninstall(str(tmp_path / "bin"), [Engine()])
    assert not policy_file.exists() and not policy_file.parent.exists()


def test_doctor_shows_the_policy_in_one_line(policy_file):
    status, what, _ = policy.check_policy()
    assert status == "ok" and "no " + str(policy_file) in what
    assert "containers may set nothing that weakens the boundary" in what
    write(policy_file, '{"container_may_set": ["DKVM_SYS_ADMIN"]}')
    status, what, _ = policy.check_policy()
    assert status == "ok" and "containers may set DKVM_SYS_ADMIN;" in what
    assert "operator's only: DKVM_KERNEL=image, DKVM_KERNEL_APPEND" in what
    write(policy_file, '{"container_may_set": ["ALL"]}')
    status, what, fix = policy.check_policy()
    assert status == "fail" and "ALL is not a permission" in what and fix
    assert "\n" not in what
