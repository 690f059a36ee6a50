"""An integration test of handoff.py with its two ends (host/rewrite writing an exec's
request, roles/exec_relay reading it), since the bounds only hold end to end.
The plan and each exec's request reach the container side whole, however big the
workload's environment (an environment string stops at 128 KiB): the plan as a file
in the container's root, an exec's request as a descriptor runc preserves. Neither is
read through a link, from something that is not a regular file, or past its bound."""
import json
import os
import stat
import subprocess
import sys
import threading

import pytest

from unitutil import REPO, load_config, rewrite
from dkvm import handoff, paths
from dkvm.errors import DkvmError
from dkvm.host.engines import DOCKER
from dkvm.host.rewrite import rewrite_exec_process
from dkvm.roles import exec_relay
from dkvm.schema import ExecRequest, Plan

# 40 variables of 4 KiB and one of 120 KiB: 280 KiB, each under MAX_ARG_STRLEN
BIG_ENV = [f"V{i:02d}={chr(65 + i % 26) * 4096}" for i in range(40)] + ["HUGE=" + "h" * (120 << 10)]


def big_config():
    config = load_config("plain")
    config["process"]["env"] = list(config["process"]["env"]) + BIG_ENV
    return config


def test_the_bounds_are_the_control_channels_frame():
    from dkvm import wire
    assert handoff.MAX_PAYLOAD == wire.MAX_PAYLOAD
    assert handoff.MAX_PLAN_BYTES < handoff.MAX_REQUEST_BYTES < wire.MAX_PAYLOAD


# --- create: the plan's file ----------------------------------------------------------

def test_a_big_environment_reaches_the_entrypoint_whole(tmp_path):
    new, plan = rewrite(big_config())
    assert all(len(item) < 128 << 10 for item in new["process"]["env"])
    handoff.write_plan(str(tmp_path), plan.to_json())
    read = handoff.own_plan(str(tmp_path))
    assert read == plan
    assert read.process.env[-41:] == BIG_ENV


def test_the_plan_is_roots_alone_and_replaced_whole(tmp_path):
    _, plan = rewrite(load_config("plain"))
    handoff.write_plan(str(tmp_path), "{}")
    handoff.write_plan(str(tmp_path), plan.to_json())
    info = os.stat(tmp_path / paths.PLAN_FILE)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    assert sorted(os.listdir(tmp_path)) == [paths.PLAN_FILE]
    assert handoff.own_plan(str(tmp_path)) == plan


def test_writing_the_plan_follows_no_link_left_at_its_temporary_name(tmp_path):
    """A link or a FIFO at the temporary name (a container side that once could write
    its root, on a bundle Podman keeps) is removed, never written through."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    root = tmp_path / "root"
    root.mkdir()
    (root / (paths.PLAN_FILE + ".dkvm-tmp")).symlink_to(victim)
    (root / paths.PLAN_FILE).symlink_to(victim)
    handoff.write_plan(str(root), '{"container_id": "x"}')
    assert victim.read_text() == "untouched"
    assert not (root / paths.PLAN_FILE).is_symlink()
    assert handoff.read_plan(str(root)) == '{"container_id": "x"}'


@pytest.mark.parametrize("kind", ["link", "fifo", "directory", "missing", "too big"])
def test_a_plan_that_is_not_a_regular_file_of_its_size_is_not_read(tmp_path, kind):
    """Checked on a descriptor that opened nothing (O_PATH): a FIFO would block a
    reader forever; the test gives up after 10 s."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / paths.PLAN_FILE).write_text("{}")
    root = tmp_path / "root"
    root.mkdir()
    plan = root / paths.PLAN_FILE
    if kind == "link":
        plan.symlink_to(elsewhere / paths.PLAN_FILE)
    elif kind == "fifo":
        os.mkfifo(plan)
    elif kind == "directory":
        plan.mkdir()
    elif kind == "too big":
        plan.write_text(" " * (handoff.MAX_PLAN_BYTES + 1))
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(read_or_error(str(root))),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert outcome and isinstance(outcome[0], DkvmError), outcome
    assert "the plan in the container's root cannot be read" in outcome[0].message
    assert "\n" not in outcome[0].message


def read_or_error(root):
    try:
        return handoff.own_plan(root)
    except DkvmError as err:
        return err


def test_a_plan_too_big_for_its_frame_is_refused_at_create_in_one_line(tmp_path):
    """The plan reaches the guest as one control-channel frame: beyond it, create says
    so (runc's own ceiling, ARG_MAX, is about twice as high)."""
    config = load_config("plain")
    config["process"]["env"] += [f"V{i}={'x' * (100 << 10)}" for i in range(10)]
    _, plan = rewrite(config)
    with pytest.raises(DkvmError) as info:
        handoff.write_plan(str(tmp_path), plan.to_json())
    assert info.value.message.startswith("the container's arguments and environment take "
                                         "100")
    assert "KiB as DKVM carries them into the VM, more than its 896 KiB" in info.value.message
    assert os.listdir(tmp_path) == []


# --- exec: the request's descriptor ---------------------------------------------------

@pytest.mark.parametrize("args,want_args,fd", [
    (["--process", "/p", "--detach", "id"], ["--preserve-fds=1", "--process", "/p", "--detach",
                                             "id"], 3),
    (["--preserve-fds", "2", "--process", "/p", "id"], ["--preserve-fds=3", "--process", "/p",
                                                        "id"], 5),
    (["--process", "/p", "--preserve-fds=1", "id"], ["--preserve-fds=2", "--process", "/p",
                                                     "id"], 4),
    (["-preserve-fds=0", "-p", "/p", "id"], ["--preserve-fds=1", "-p", "/p", "id"], 3),
])
def test_the_request_takes_the_descriptor_after_the_engines(args, want_args, fd):
    assert handoff.request_descriptor(args) == (want_args, fd)


@pytest.mark.parametrize("value", ["x", "-1", "1e3", "\u0661", "9" * 40])
def test_a_preserve_fds_that_is_not_a_count_is_one_line(value):
    with pytest.raises(DkvmError, match="--preserve-fds"):
        handoff.request_descriptor(["--preserve-fds", value, "--process", "/p", "id"])


CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
from dkvm import handoff
engines = os.open("/dev/null", os.O_RDONLY)     # the engine's own preserved descriptor
os.dup2(engines, 3)
os.set_inheritable(3, True)
args, fd = handoff.request_descriptor(["--preserve-fds", "1", "--process", "/p", "id"])
handoff.pass_request(fd, sys.stdin.read())
# what runc does: exec, the preserved descriptors open across it
os.execv(sys.executable, [sys.executable, "-c",
         "import os, sys; sys.path.insert(0, sys.argv[1]);"
         "from dkvm.roles.exec_relay import request_from;"
         "print(os.path.realpath('/proc/self/fd/3'), sys.argv[2:]);"
         "print(request_from(['dkvm-exec-relay', '--request-fd', '4']).to_json())",
         sys.argv[1], *args])
"""


def test_the_request_crosses_exec_as_the_relay_reads_it():
    """A real descriptor through a real exec: a 280 KiB environment arrives whole at
    the descriptor the relay is told, after the engine's own."""
    process = load_config("plain")["process"]
    process["env"] = list(process["env"]) + BIG_ENV
    relay, request = rewrite_exec_process(process, "cid", DOCKER.default_capabilities, 4)
    assert relay["args"][-2:] == [paths.EXEC_REQUEST_FD, "4"]
    result = subprocess.run([sys.executable, "-c", CHILD, str(REPO)], input=request.to_json(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == "/dev/null ['--preserve-fds=2', '--process', '/p', 'id']"
    assert ExecRequest.from_json(second) == request
    assert ExecRequest.from_json(second).process.env[-41:] == BIG_ENV


def test_a_request_too_big_for_its_frame_is_refused_at_exec_in_one_line():
    text = json.dumps({"process": {"env": ["X=" + "x" * handoff.MAX_REQUEST_BYTES]}})
    with pytest.raises(DkvmError) as info:
        handoff.pass_request(1000, text)
    assert info.value.message.startswith("the exec's arguments and environment take ")


@pytest.mark.parametrize("words", [[], ["--request-fd"], ["--request-fd", "x"],
                                   ["--other", "3"], ["--request-fd", "3", "more"]])
def test_the_relay_wants_its_descriptor_named(words):
    with pytest.raises(DkvmError) as info:
        exec_relay.request_from(["dkvm-exec-relay", *words])
    assert info.value.exit_code == 126 and "--request-fd N" in info.value.message


def test_the_relay_reads_only_a_regular_file_at_its_descriptor():
    """A pipe (or anything but the memfd the runtime made) is refused, in one line."""
    read, write = os.pipe()
    os.write(write, b'{"container_id": "x"}')
    os.close(write)
    with pytest.raises(DkvmError) as info:
        exec_relay.request_from(["dkvm-exec-relay", "--request-fd", str(read)])
    assert info.value.exit_code == 126
    assert "the exec's request cannot be read" in info.value.message
    with pytest.raises(OSError):
        os.fstat(read)                  # closed all the same


def test_the_relay_takes_none_of_the_workloads_environment():
    """Its environment is DKVM's PATH: an LD_PRELOAD from `-e` would load into the
    container side."""
    process = {"args": ["sh"], "env": ["LD_PRELOAD=/x.so", "PATH=/bin"], "cwd": "/"}
    relay, request = rewrite_exec_process(process, "cid", DOCKER.default_capabilities, 3)
    assert [e.partition("=")[0] for e in relay["env"]] == ["PATH"]
    assert "LD_PRELOAD=/x.so" in request.process.env


def test_the_entrypoint_reads_the_plan_from_its_root(tmp_path):
    _, plan = rewrite(load_config("plain"))
    handoff.write_plan(str(tmp_path), plan.to_json())
    assert handoff.own_plan(str(tmp_path)) == Plan.from_json(plan.to_json())
