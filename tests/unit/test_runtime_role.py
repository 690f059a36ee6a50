"""dkvm-runtime: finding runc's subcommand and flags on the command lines containerd
really uses, reporting errors into runc's log, and the argv[0] role dispatch."""
import json
import os
import re
from pathlib import Path

import pytest

import dkvm.__main__ as dkvm_main
from unitutil import KERNELS, load_config, plan_of, with_env
from dkvm import paths
from dkvm.schema import Capabilities
from dkvm.errors import DkvmError, run_role
from dkvm.host import facts, payload
from dkvm.host.runc_cli import container_id, find_subcommand, flag_value, report_to_runc_log
from dkvm.roles import runtime

LOG = "/run/containerd/io.containerd.runtime.v2.task/moby/0123abcd/log.json"
CREATE = ["--root", "/var/run/docker/runtime-runc/moby", "--log", LOG, "--log-format", "json",
          "create", "--bundle", "/b", "--pid-file", "/p", "id"]


@pytest.mark.parametrize("args,command,index", [
    (CREATE, "create", 6),
    (["--systemd-cgroup", "state", "id"], "state", 1),
    (["--root", "/r", "--log=/l", "--debug", "delete", "--force", "id"], "delete", 4),
    (["--rootless", "auto", "--criu", "/usr/sbin/criu", "start", "id"], "start", 4),
    (["--root", "/var/run/docker/runtime-runc/moby", "--log", LOG, "--log-format", "json",
      "exec", "--process", "/tmp/p.json", "--detach", "id"], "exec", 6),
    (["--version"], None, 1),
    ([], None, 0),
    (["--root", "/r"], None, 2),
])
def test_find_subcommand(args, command, index):
    assert find_subcommand(args) == (command, index)


def test_flag_values_on_create_line():
    command, index = find_subcommand(CREATE)
    create_args = CREATE[index + 1:]
    assert flag_value(create_args, "--bundle", "-b") == "/b"
    assert flag_value(create_args, "--pid-file") == "/p"
    assert flag_value(create_args, "--console-socket") is None
    assert flag_value(CREATE, "--log") == LOG
    assert flag_value(CREATE, "--log-format") == "json"
    assert flag_value(CREATE, "--root") == "/var/run/docker/runtime-runc/moby"


@pytest.mark.parametrize("args,want", [
    (["-b", "/short", "id"], "/short"),
    (["--bundle=/eq", "id"], "/eq"),
    (["-b=/eq2", "id"], "/eq2"),
    (["--bundlex", "/no", "id"], None),
    (["id", "--bundle"], None),              # flag without a value
])
def test_flag_value_forms(args, want):
    assert flag_value(args, "--bundle", "-b") == want


@pytest.mark.parametrize("args,cid", [
    (["--bundle", "/b", "--pid-file", "/p", "0123abcd"], "0123abcd"),
    (["--process", "/p.json", "--detach", "--pid-file", "/x", "0123abcd"], "0123abcd"),
    (["--bundle", "/b", "--no-pivot"], ""),
    ([], ""),
])
def test_container_id_is_the_last_argument(args, cid):
    assert container_id(args) == cid


def test_flag_value_does_not_confuse_prefixes():
    args = ["--log-format", "json", "--log", "/l.json"]
    assert flag_value(args, "--log") == "/l.json"
    assert flag_value(["--log-format=json"], "--log") is None


def test_report_to_runc_log_json(tmp_path):
    log = tmp_path / "log.json"
    log.write_text('{"level":"info","msg":"earlier"}\n')
    args = ["--root", "/r", "--log", str(log), "--log-format", "json", "create", "id"]
    report_to_runc_log(args, "dkvm: DKVM_ACCEL='foo' is not valid")
    lines = log.read_text().splitlines()
    assert lines[0] == '{"level":"info","msg":"earlier"}'      # appended, not replaced
    assert len(lines) == 2
    entry = json.loads(lines[1])
    assert entry["level"] == "error"
    assert entry["msg"] == "dkvm: DKVM_ACCEL='foo' is not valid"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["time"])


def test_report_to_runc_log_text(tmp_path):
    log = tmp_path / "log"
    report_to_runc_log(["--log", str(log), "create", "id"], "dkvm: boom")
    assert log.read_text() == "dkvm: boom\n"


def test_report_to_runc_log_without_log_or_unwritable(tmp_path):
    report_to_runc_log(["create", "id"], "boom")           # no --log: nothing to do
    missing = tmp_path / "no" / "such" / "dir" / "log.json"
    report_to_runc_log(["--log", str(missing), "create", "id"], "boom")
    assert not missing.exists()


# --- runtime main, with the host and runc faked ------------------------------------

class Exec(Exception):
    pass


@pytest.fixture
def fake_host(monkeypatch, tmp_path):
    calls = {}

    def execv(path, argv):
        calls["exec"] = (path, argv)
        raise Exec()

    monkeypatch.setattr(payload, "ensure_payload", lambda: "/var/lib/dkvm/feedface")
    monkeypatch.setattr(facts, "kvm_usable", lambda: False)
    monkeypatch.setattr(payload, "payload_kernels", lambda d: dict(KERNELS))
    monkeypatch.setattr(facts, "find_runc", lambda explicit="": explicit or "/usr/bin/runc")
    def run_runc(path, args):
        """`create`: runc as a child; what it would read is kept here."""
        calls["exec"] = (path, [path] + args)
        bundle = args[args.index("--bundle") + 1]
        calls["config"] = json.loads((Path(bundle) / "config.json").read_text())
        return 0

    monkeypatch.setattr(runtime.os, "execv", execv)
    monkeypatch.setattr(runtime, "run_runc", run_runc)
    return calls


def bundle_with(tmp_path, config):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


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
    assert new["mounts"][0]["options"][-1] == "ro"


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


def test_main_exec_rewrites_the_process_and_execs_runc(fake_host, tmp_path):
    process_file = tmp_path / "process.json"
    process_file.write_text(json.dumps(EXEC_PROCESS))
    runc_args = ["--root", "/r", "exec", "--process", str(process_file), "--detach", "id"]
    with pytest.raises(Exec):
        runtime.main(["dkvm-runtime", *runc_args])
    assert fake_host["exec"] == ("/usr/bin/runc", ["/usr/bin/runc"] + runc_args)
    relay = json.loads(process_file.read_text())
    assert relay["args"] == paths.role_argv("dkvm-exec")
    assert relay["user"] == {"uid": 0, "gid": 0}
    assert relay["noNewPrivileges"] is True
    request = json.loads(dict(e.split("=", 1) for e in relay["env"])["DKVM_EXEC"])
    assert relay["capabilities"]["bounding"] == []
    assert request == {"container_id": "id", "process": {
        "args": ["sh", "-c", "id"], "env": ["PATH=/usr/bin:/bin", "FOO=bar"], "cwd": "/srv",
        "uid": 1000, "gid": 1000, "additional_gids": [2000], "terminal": True,
        "rlimits": [], "no_new_privileges": False, "oom_score_adj": 0,
        "capabilities": Capabilities(exact=True, bounding=["CAP_CHOWN"]).as_dict()}}


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


# --- argv[0] dispatch --------------------------------------------------------------

@pytest.mark.parametrize("argv0,role,module", [
    ("dkvm-runtime", "runtime", "dkvm.roles.runtime"),
    ("/usr/local/bin/dkvm-runtime", "runtime", "dkvm.roles.runtime"),
    ("dkvm-ctr-entrypoint", "entrypoint", "dkvm.roles.ctr_entrypoint"),
    ("/.dkvm/entry/dkvm-ctr-entrypoint", "entrypoint", "dkvm.roles.ctr_entrypoint"),
    ("/.dkvm/entry/dkvm-vm-init", "vm-init", "dkvm.roles.vm_init"),
    ("dkvm-vm-init", "vm-init", "dkvm.roles.vm_init"),
    ("/.dkvm/entry/dkvm-exec", "exec", "dkvm.roles.exec_relay"),
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
    for _, module in list(dkvm_main.ROLES.values()) + [dkvm_main.DEFAULT_ROLE]:
        assert callable(importlib.import_module(module).main)


def test_main_dispatches_and_exits_with_role_code(capsys, monkeypatch, tmp_path):
    """dkvm-exec with no VM to reach: the relay role's error and exit code, on one line
    that names the role and the container."""
    from dkvm.roles import exec_relay
    monkeypatch.setenv("DKVM_EXEC", json.dumps({"container_id": "feedface0123456789",
                                                "process": {"args": ["true"]}}))
    monkeypatch.setattr(exec_relay.paths, "EXEC_SOCKET", str(tmp_path / "missing.sock"))
    monkeypatch.setattr(exec_relay, "CONNECT_TIMEOUT", 0)
    with pytest.raises(SystemExit) as info:
        dkvm_main.main(["/.dkvm/entry/dkvm-exec", "sh"])
    assert info.value.code == 126
    assert capsys.readouterr().err == \
        "dkvm[exec feedface0123]: the VM was not ready for exec within 0s\n"


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


@pytest.mark.parametrize("key", ["io.kubernetes.cri.container-type",
                                 "io.kubernetes.cri-o.ContainerType"])
def test_a_pods_sandbox_is_runcs_as_it_is(fake_host, tmp_path, key):
    """The pause container CRI starts with the pod's runtime class holds the pod's
    namespaces: no VM for it; the pod's containers get theirs."""
    config = load_config("plain")
    config["annotations"] = {key: "sandbox"}
    bundle = bundle_with(tmp_path, config)
    with pytest.raises(Exec):
        runtime.main(["dkvm-runtime", "create", "--bundle", str(bundle), "pause"])
    assert json.loads((bundle / "config.json").read_text()) == config
    config["annotations"] = {key: "container"}
    (bundle / "config.json").write_text(json.dumps(config))
    assert runtime.main(["dkvm-runtime", "create", "--bundle", str(bundle), "app"]) == 0
    assert plan_of(fake_host["config"]).container_id == "app"


def test_runc_runs_as_a_child_with_its_exit_status(tmp_path):
    """What create waits for: the real fork and exec, the status as a shell shows it."""
    script = tmp_path / "fake-runc"
    script.write_text('#!/bin/sh\n[ "$1" = create ] && exit 3\nkill -TERM $$\n')
    script.chmod(0o755)
    assert runtime.run_runc(str(script), ["create", "x"]) == 3
    assert runtime.run_runc(str(script), ["other"]) == 128 + 15
