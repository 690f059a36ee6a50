"""runc's command line as engines write it, parsed once (host.runc_cli): the subcommand
after runc's global flags, what each subcommand names, DKVM's own --dkvm-* flags taken
out, and errors reported into runc's log."""
import json
import os
import re

import pytest

from dkvm.errors import DkvmError
from dkvm.host.runc_cli import parse, report_to_runc_log
from dkvm.options import BY_ENV, OPTIONS

LOG = "/run/containerd/io.containerd.runtime.v2.task/moby/0123abcd/log.json"
CREATE = ["--root", "/var/run/docker/runtime-runc/moby", "--log", LOG, "--log-format", "json",
          "create", "--bundle", "/b", "--pid-file", "/p", "id"]


@pytest.mark.parametrize("args,command,global_args", [
    (CREATE, "create", CREATE[:6]),
    (["--systemd-cgroup", "state", "id"], "state", ["--systemd-cgroup"]),
    (["--root", "/r", "--log=/l", "--debug", "delete", "--force", "id"], "delete",
     ["--root", "/r", "--log=/l", "--debug"]),
    (["--rootless", "auto", "--criu", "/usr/sbin/criu", "start", "id"], "start",
     ["--rootless", "auto", "--criu", "/usr/sbin/criu"]),
    (["--root", "/var/run/docker/runtime-runc/moby", "--log", LOG, "--log-format", "json",
      "exec", "--process", "/tmp/p.json", "--detach", "id"], "exec", CREATE[:6]),
    (["-root", "/r", "-log", "/l", "state", "id"], "state", ["-root", "/r", "-log", "/l"]),
    (["--version"], None, ["--version"]),
    ([], None, []),
    (["--root", "/r"], None, ["--root", "/r"]),
])
def test_the_subcommand_follows_runcs_global_flags(args, command, global_args):
    call = parse(args)
    assert (call.command, call.global_args) == (command, global_args)
    assert call.runc_args() == args             # no DKVM flag: runc gets the line as it was


def test_what_create_names():
    call = parse(CREATE)
    assert call.command_args == ["--bundle", "/b", "--pid-file", "/p", "id"]
    assert (call.bundle, call.container_id, call.log, call.log_format) == ("/b", "id", LOG,
                                                                           "json")
    assert call.flag("pid-file") == "/p" and call.flag("console-socket") is None
    assert parse(["create", "id"]).bundle == os.getcwd()    # runc's default


@pytest.mark.parametrize("args,want", [
    (["-b", "/short", "id"], "/short"),
    (["--bundle=/eq", "id"], "/eq"),
    (["-b=/eq2", "id"], "/eq2"),
    (["-bundle", "/one-dash", "id"], "/one-dash"),
    (["--bundlex", "/no", "id"], None),
])
def test_a_flag_takes_one_dash_or_two_and_its_value_after_it_or_after_an_equals(args, want):
    assert parse(["create", *args]).flag("bundle", "b") == want


def test_a_flag_without_a_value_has_none():
    assert parse(["create", "id", "--bundle"]).flag("bundle", "b") is None


@pytest.mark.parametrize("args,cid", [
    (["create", "--bundle", "/b", "--pid-file", "/p", "0123abcd"], "0123abcd"),
    (["exec", "--process", "/p.json", "--detach", "--pid-file", "/x", "0123abcd"], "0123abcd"),
    (["update", "--resources", "-", "0123abcd"], "0123abcd"),
    (["create", "--bundle", "/b", "--no-pivot"], ""),
    (["delete"], ""),
    (["kill", "--all", "0123abcd", "KILL"], "0123abcd"),
    (["kill", "0123abcd"], "0123abcd"),
])
def test_the_container_is_the_last_argument_but_kills_first(args, cid):
    assert parse(args).container_id == cid


def test_kills_signal_is_its_second_argument():
    assert parse(["kill", "-a", "id", "STOP"]).signal == "STOP"
    assert parse(["kill", "id"]).signal == ""


def test_exec_names_its_process_file():
    assert parse(["exec", "-p", "/p.json", "id"]).process_file == "/p.json"
    assert parse(["exec", "id", "sh"]).process_file == ""


def test_the_log_is_found_whatever_its_form():
    assert parse(["--log-format", "json", "--log", "/l.json", "state", "x"]).log == "/l.json"
    assert parse(["--log-format=json", "state", "x"]).log is None
    assert parse(["--log=/l", "--log-format=text", "state", "x"]).log_format == "text"


def test_our_own_state_call_leaves_runcs_log_out():
    call = parse(["--root", "/r", "--log", "/l", "--log-format=json", "-log=/m", "--debug",
                  "kill", "id"])
    assert call.state_args() == ["--root", "/r", "--debug"]


def test_report_to_runc_log_json(tmp_path):
    log = tmp_path / "log.json"
    log.write_text('{"level":"info","msg":"earlier"}\n')
    args = ["--root", "/r", "--log", str(log), "--log-format", "json", "create", "id"]
    report_to_runc_log(parse(args), "dkvm: DKVM_ACCEL='foo' is not valid")
    lines = log.read_text().splitlines()
    assert lines[0] == '{"level":"info","msg":"earlier"}'      # appended, not replaced
    assert len(lines) == 2
    entry = json.loads(lines[1])
    assert entry["level"] == "error"
    assert entry["msg"] == "dkvm: DKVM_ACCEL='foo' is not valid"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["time"])


def test_report_to_runc_log_text(tmp_path):
    log = tmp_path / "log"
    report_to_runc_log(parse(["--log", str(log), "create", "id"]), "dkvm: boom")
    assert log.read_text() == "dkvm: boom\n"


def test_report_to_runc_log_without_log_or_unwritable(tmp_path):
    report_to_runc_log(parse(["create", "id"]), "boom")    # no --log: nothing to do
    missing = tmp_path / "no" / "such" / "dir" / "log.json"
    report_to_runc_log(parse(["--log", str(missing), "create", "id"]), "boom")
    assert not missing.exists()


# --- runtime arguments -------------------------------------------------------------

RUNC_ARGS = ["--root", "/var/run/docker/runtime-runc/moby", "--log", "/run/log.json",
             "--log-format", "json", "--systemd-cgroup", "create", "--bundle", "/b",
             "--pid-file", "/p", "id"]


def read_dkvm_flags(argv):
    """(runc's argv, --dkvm-runc, the operator's values) as the runtime parses them."""
    call = parse(argv)
    call.check()
    return call.runc_args(), call.runc, call.operator


def test_dkvm_flags_are_taken_out_of_runcs_line():
    argv = (["--dkvm-runc=/usr/sbin/runc.real"] + RUNC_ARGS[:4] + ["--dkvm-accel=tcg"]
            + RUNC_ARGS[4:])
    assert read_dkvm_flags(argv) == (RUNC_ARGS, "/usr/sbin/runc.real", {"--dkvm-accel": "tcg"})


def test_a_dkvm_flags_value_may_be_the_next_word():
    assert read_dkvm_flags(["--dkvm-runc", "/opt/runc"] + RUNC_ARGS) == \
        (RUNC_ARGS, "/opt/runc", {})
    assert read_dkvm_flags(["--dkvm-kernel-append", "-tsc"] + RUNC_ARGS)[2] == \
        {"--dkvm-kernel-append": "-tsc"}


def test_runcs_flags_are_left_alone():
    argv = ["--log=/x", "--debug", "--root", "/r", "--criu", "criu", "state", "abc123"]
    assert read_dkvm_flags(argv) == (argv, "", {})
    argv = ["--root", "/r", "exec", "--process", "/p", "--dkvm-like-arg", "abc123"]
    assert read_dkvm_flags(argv) == (argv, "", {})      # after the subcommand: runc's


def test_an_unknown_dkvm_flag_is_refused_naming_those_accepted():
    with pytest.raises(DkvmError) as info:
        read_dkvm_flags(["--dkvm-acel=tcg"] + RUNC_ARGS)
    msg = info.value.message
    assert "--dkvm-acel" in msg and "--dkvm-accel" in msg and "--dkvm-runc" in msg


def test_dkvm_flag_values_are_read_at_create_only():
    """A bad value in daemon.json fails `docker run` (settings.parse_settings), not every
    `docker rm`: the command line keeps it as text."""
    assert read_dkvm_flags(["--dkvm-accel=fast"] + RUNC_ARGS)[2] == {"--dkvm-accel": "fast"}


def test_every_option_has_a_runtime_argument_and_allow_adds_up():
    argv = ["--dkvm-kernel-append", "loglevel=4", "--dkvm-sys-admin=1", "--dkvm-kernel=image",
            "--dkvm-allow=DKVM_SYS_ADMIN", "--dkvm-allow", "DKVM_KERNEL_APPEND"] + RUNC_ARGS
    rest, _, operator = read_dkvm_flags(argv)
    assert rest == RUNC_ARGS
    assert operator == {"--dkvm-kernel-append": "loglevel=4", "--dkvm-sys-admin": "1",
                        "--dkvm-kernel": "image",
                        "--dkvm-allow": "DKVM_SYS_ADMIN,DKVM_KERNEL_APPEND"}
    for option in OPTIONS:
        assert read_dkvm_flags([option.runtime_arg + "=x"])[2] == {option.runtime_arg: "x"}
    assert BY_ENV["DKVM_KERNEL_APPEND"].runtime_arg == "--dkvm-kernel-append"
