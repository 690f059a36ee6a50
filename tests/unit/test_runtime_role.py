"""dkvm-runtime's main (roles/runtime) with the host and runc faked: create, exec and
the other commands, errors into runc's log; and the argv[0] role dispatch. runc's
command line itself is test_runc_cli's."""
import json
import os

import pytest

import dkvm.__main__ as dkvm_main
from unitutil import Exec, bundle_with, load_config, plan_of, with_env
from dkvm import handoff, paths
from dkvm.schema import Capabilities
from dkvm.errors import DkvmError, run_role
from dkvm.host import facts
from dkvm.roles import runtime


def plan_template_name(plan):
    return f"dkvm-tcg-{len(os.sched_getaffinity(0))}cpu-{plan.memory_mib}m"


# --- runtime main, with the host and runc faked ------------------------------------

def test_main_create_rewrites_runs_runc_and_restores_the_config(fake_host, tmp_path):
    bundle = bundle_with(tmp_path, load_config("tty-init"))
    log = tmp_path / "log.json"
    runc_args = ["--root", "/r", "--log", str(log), "--log-format", "json", "create",
                 "--bundle", str(bundle), "--pid-file", "/p", "id"]
    assert runtime.main(["dkvm-runtime", "--dkvm-runc=/opt/runc", "--dkvm-accel", "tcg",
                         *runc_args]) == 0
    assert fake_host["exec"] == ("/opt/runc", ["/opt/runc"] + runc_args)
    new = fake_host["config"]
    # runc read the rewrite; the bundle has the engine's config again
    assert json.loads((bundle / "config.json").read_text()) == load_config("tty-init")
    plan = plan_of(new)
    assert plan.process.args == ["/sbin/docker-init", "--", "/bin/sh", "-c", "true"]
    assert plan.options.accel == "tcg"
    assert plan.container_id == "id"
    assert new["mounts"][-5]["source"] == "/var/lib/dkvm/feedface"
    # no template for the machine yet: the VM boots cold, and the template is made
    assert plan.template == "" and fake_host["templates"] == [plan_template_name(plan)]
    assert not log.exists()
    # the container's own root: its mount points, made in the bundle
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "dkvm-root"]
    assert new["root"] == {"path": os.path.realpath(bundle / "dkvm-root"), "readonly": True}
    for mount in new["mounts"]:
        if not mount["destination"].startswith("/share/rootfs/"):
            assert (bundle / "dkvm-root" / mount["destination"].lstrip("/")).is_dir() or \
                mount["destination"].startswith(("/dev/", "/sys/")), mount


def test_create_read_only_makes_the_mount_points_in_the_image(fake_host, tmp_path):
    """runc cannot make mount points in the read-only image, nor the guest those of its
    tmpfs: create makes them, as runc would have, where they resolve in the image."""
    image = tmp_path / "rootfs"
    (image / "etc").mkdir(parents=True)
    (image / "data").symlink_to("srv/data")
    (tmp_path / "hosts").write_text("")
    config = load_config("resources-tmpfs-volume")
    config["root"] = {"path": str(image), "readonly": True}
    config["mounts"] = [m for m in config["mounts"] if not m["destination"].startswith("/etc")]
    config["mounts"] += [
        {"destination": "/data/x", "type": "bind", "source": str(tmp_path), "options": ["rbind"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(tmp_path / "hosts"),
         "options": ["rbind"]}]
    bundle = bundle_with(tmp_path, config)
    assert runtime.main(["dkvm-runtime", "create", "--bundle", str(bundle), "id"]) == 0
    assert (image / "hosttmp").is_dir()                     # a volume's
    assert (image / "srv" / "data" / "x").is_dir()          # through the image's link
    assert (image / "etc" / "hosts").is_file()              # a file's, for a file
    assert (image / "scratch").is_dir()                     # a --tmpfs, for the guest
    new = fake_host["config"]
    assert "ro" in new["mounts"][0]["options"] and "rw" not in new["mounts"][0]["options"]


def test_main_other_commands_pass_through(fake_host, tmp_path):
    with pytest.raises(Exec):
        runtime.main(["dkvm-runtime", "--systemd-cgroup", "state", "id"])
    assert fake_host["exec"] == ("/usr/bin/runc", ["/usr/bin/runc", "--systemd-cgroup",
                                                   "state", "id"])


def test_main_create_error_reaches_runc_log(fake_host, tmp_path, log_context):
    config = with_env(load_config("plain"), "DKVM_ACCEL=foo")
    bundle = bundle_with(tmp_path, config)
    log = tmp_path / "log.json"
    log_context.set_role("runtime")
    with pytest.raises(DkvmError):
        runtime.main(["dkvm-runtime", "--log", str(log), "--log-format", "json", "create",
                      "--bundle", str(bundle), "0123456789abcdef"])
    assert "exec" not in fake_host
    entry = json.loads(log.read_text())
    assert entry["level"] == "error"
    # one prefix naming the role and the container, then the message
    assert entry["msg"] == ("dkvm[runtime 0123456789ab]: DKVM_ACCEL='foo' is not valid: use "
                            "one of auto, kvm, tcg")
    # the bundle's config is left as dockerd wrote it
    assert json.loads((bundle / "config.json").read_text()) == config


EXEC_PROCESS = {
    "terminal": True, "user": {"uid": 1000, "gid": 1000, "additionalGids": [2000]},
    "args": ["sh", "-c", "id"], "cwd": "/srv",
    "env": ["PATH=/usr/bin:/bin", "DKVM_ACCEL=tcg", "FOO=bar"],
    "capabilities": {"bounding": ["CAP_CHOWN"], "effective": [], "permitted": []},
}


def test_main_exec_rewrites_the_process_and_execs_runc(fake_host, tmp_path, monkeypatch):
    """The relay's request goes to runc as one more preserved descriptor (handed over
    here to a stand-in: test_handoff passes a real one through exec)."""
    passed = {}
    monkeypatch.setattr(handoff, "pass_request", lambda fd, text: passed.update({fd: text}))
    process_file = tmp_path / "process.json"
    process_file.write_text(json.dumps(EXEC_PROCESS))
    runc_args = ["--root", "/r", "exec", "--process", str(process_file), "--detach", "id"]
    with pytest.raises(Exec):
        runtime.main(["dkvm-runtime", *runc_args])
    assert fake_host["exec"] == ("/usr/bin/runc", ["/usr/bin/runc", "--root", "/r", "exec",
                                                   "--preserve-fds=1"] + runc_args[3:])
    relay = json.loads(process_file.read_text())
    assert relay["args"] == paths.role_argv("dkvm-exec-relay") + ["--request-fd", "3"]
    assert relay["user"] == {"uid": 0, "gid": 0}
    assert relay["noNewPrivileges"] is True
    assert [e.partition("=")[0] for e in relay["env"]] == ["PATH"]
    request = json.loads(passed[3])
    assert relay["capabilities"]["bounding"] == []
    assert request == {"container_id": "id", "process": {
        "args": ["sh", "-c", "id"], "env": ["PATH=/usr/bin:/bin", "FOO=bar"], "cwd": "/srv",
        "uid": 1000, "gid": 1000, "additional_gids": [2000], "terminal": True,
        "rlimits": [], "no_new_privileges": False, "oom_score_adj": 0,
        "capabilities": Capabilities(exact=True, bounding=["CAP_CHOWN"]).as_dict()},
        "member": False}


def test_an_unexpected_error_is_one_line_with_one_prefix(fake_host, tmp_path, monkeypatch):
    """Not a DkvmError (a bug, a bundle that is not JSON): runc's log still gets one
    line, prefixed once."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{not json")
    log = tmp_path / "log"
    with pytest.raises(ValueError):
        runtime.main(["dkvm-runtime", "--log", str(log), "create", "--bundle", str(bundle),
                      "cid"])
    (line,) = log.read_text().splitlines()
    assert line.startswith("dkvm[cid]: JSONDecodeError(") and line.count("dkvm") == 1


def test_main_exec_without_process_file_is_refused_and_logged(fake_host, tmp_path):
    log = tmp_path / "log"
    with pytest.raises(DkvmError):
        runtime.main(["dkvm-runtime", "--log", str(log), "exec", "id", "sh"])
    assert "exec" not in fake_host
    assert "--process" in log.read_text()


def test_main_bad_runtime_arg_reaches_runc_log(fake_host, tmp_path):
    log = tmp_path / "log.json"
    with pytest.raises(DkvmError):
        runtime.main(["dkvm-runtime", "--dkvm-bogus=1", "--log", str(log), "--log-format",
                      "json", "state", "id"])
    assert "exec" not in fake_host
    assert "--dkvm-bogus" in json.loads(log.read_text())["msg"]


@pytest.mark.parametrize("bad", [["--dkvm-acel", "tcg"], ["--dkvm-flag"]])
def test_an_unknown_dkvm_flag_before_runcs_log_still_reaches_it(fake_host, tmp_path, bad):
    """The engine shows what runc's log says: the line is written there even when the
    unknown flag (whose value form DKVM cannot know) comes before --log."""
    log = tmp_path / "log"
    with pytest.raises(DkvmError):
        runtime.main(["dkvm-runtime", "--dkvm-runc=/opt/runc", *bad, "--log", str(log),
                      "delete", "id"])
    assert "exec" not in fake_host
    assert f"unknown runtime argument {bad[0]}: DKVM accepts" in log.read_text()


# --- argv[0] dispatch --------------------------------------------------------------

@pytest.mark.parametrize("argv0,role,module", [
    ("dkvm-runtime", "runtime", "dkvm.roles.runtime"),
    ("/usr/local/bin/dkvm-runtime", "runtime", "dkvm.roles.runtime"),
    ("dkvm-ctr-entrypoint", "ctr-entrypoint", "dkvm.roles.ctr_entrypoint"),
    ("/.dkvm/entry/dkvm-ctr-entrypoint", "ctr-entrypoint", "dkvm.roles.ctr_entrypoint"),
    ("/.dkvm/entry/dkvm-vm-init", "vm-init", "dkvm.roles.vm_init"),
    ("dkvm-vm-init", "vm-init", "dkvm.roles.vm_init"),
    ("/.dkvm/entry/dkvm-exec-relay", "exec-relay", "dkvm.roles.exec_relay"),
    ("/.dkvm/entry/dkvm-exec", "", "dkvm.roles.cli"),
    ("dkvm", "", "dkvm.roles.cli"),
    ("/usr/local/bin/dkvm.pyz", "", "dkvm.roles.cli"),
    ("dkvm-runtime-old", "", "dkvm.roles.cli"),
    ("/usr/local/bin/dkvm-runtime/", "", "dkvm.roles.cli"),
    ("", "", "dkvm.roles.cli"),
])
def test_role_of(argv0, role, module):
    assert dkvm_main.role_of(argv0) == (role, module)


def test_every_role_module_imports():
    import importlib
    for role in dkvm_main.ROLES:
        assert dkvm_main.role_of(dkvm_main.program(role)) == (role, dkvm_main.module(role))
    for _, module in [dkvm_main.role_of(dkvm_main.program(role)) for role in dkvm_main.ROLES] \
            + [dkvm_main.CLI]:
        assert callable(importlib.import_module(module).main)


def test_main_dispatches_and_exits_with_role_code(capsys, monkeypatch, tmp_path):
    """dkvm-exec-relay with no VM to reach: the relay role's error and exit code, on one
    line that names the role and the container."""
    from dkvm.roles import exec_relay
    request = os.memfd_create("request")
    os.write(request, json.dumps({"container_id": "feedface0123456789",
                                  "process": {"args": ["true"]}}).encode())
    monkeypatch.setattr(exec_relay.paths, "EXEC_SOCKET", str(tmp_path / "missing.sock"))
    monkeypatch.setattr(exec_relay, "CONNECT_TIMEOUT", 0)
    with pytest.raises(SystemExit) as info:
        dkvm_main.main(["/.dkvm/entry/dkvm-exec-relay", "--request-fd", str(request)])
    assert info.value.code == 126
    assert capsys.readouterr().err == \
        "dkvm[exec-relay feedface0123]: the VM was not ready for exec within 0s\n"


def test_run_role_exit_codes(capsys):
    for body, code in [(lambda argv: None, 0), (lambda argv: 3, 3)]:
        with pytest.raises(SystemExit) as info:
            run_role(body, ["x"])
        assert info.value.code == code

    def fail(argv):
        raise DkvmError("bad thing", exit_code=7)

    with pytest.raises(SystemExit) as info:
        run_role(fail, ["x"])
    assert info.value.code == 7
    assert capsys.readouterr().err == "dkvm: bad thing\n"


def test_the_real_runc_is_the_first_in_path_that_is_a_program_and_not_us(tmp_path,
                                                                          monkeypatch):
    """Found without shutil (the wrapper imports as little as it can): a directory
    named runc, a file that is not executable and the wrapper itself are passed over."""
    dirs = [tmp_path / name for name in ("a", "b", "c", "d")]
    for folder in dirs:
        folder.mkdir()
    (dirs[0] / "runc").mkdir()
    (dirs[1] / "runc").write_text("not a program")
    for program in (tmp_path / "dkvm.pyz", dirs[3] / "runc"):
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    os.symlink(tmp_path / "dkvm.pyz", dirs[2] / "runc")
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, dirs)))
    monkeypatch.setattr(facts.sys, "argv", [str(tmp_path / "dkvm.pyz")])
    assert facts.find_runc() == str(dirs[3] / "runc")


def test_runc_runs_as_a_child_with_its_exit_status(tmp_path):
    """What create waits for: the real fork and exec, the status as a shell shows it."""
    script = tmp_path / "fake-runc"
    script.write_text('#!/bin/sh\n[ "$1" = create ] && exit 3\nkill -TERM $$\n')
    script.chmod(0o755)
    assert runtime.run_runc(str(script), ["create", "x"]) == 3
    assert runtime.run_runc(str(script), ["other"]) == 128 + 15
