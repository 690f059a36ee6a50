"""`runc update` of a DKVM container: a memory limit below the VM's size is refused
(its RAM is fixed at boot, and the limit must hold it), anything else passes. Driven
with a stand-in runc whose `state` names a bundle whose container's root holds a
plan, as DKVM's runtime writes it (handoff)."""
import json
import os
import threading

import pytest

from unitutil import load_config, rewrite
from dkvm import handoff, paths
from dkvm.errors import DkvmError
from dkvm.host.runc_cli import parse
from dkvm.host.update import memory_limit_check, parse_bytes

MIB = 1 << 20


def stand_in_runc(tmp_path, status="running", root=paths.SKELETON):
    """(runc whose `state` says `status` for a container whose root is `root` in its
    bundle, that root)."""
    bundle = tmp_path / "bundle"
    (bundle / root).mkdir(parents=True, exist_ok=True)
    state = {"status": status, "pid": os.getpid(), "bundle": str(bundle),
             "rootfs": os.path.realpath(bundle / root)}
    runc = tmp_path / "runc"
    runc.write_text(f"#!/bin/sh\necho '{json.dumps(state)}'\n")
    runc.chmod(0o755)
    return str(runc), bundle / root


@pytest.fixture
def container(tmp_path):
    """(runc, the container's root), whose plan is that of `-m 512m` under TCG: a VM of
    512 MiB."""
    _, plan = rewrite(load_config("resources-tmpfs-volume"))
    runc, root = stand_in_runc(tmp_path)
    handoff.write_plan(str(root), plan.to_json())
    return runc, root


def update_args(*flags):
    return parse(["--root", "/run/x", "--log", "/dev/null", "update", *flags, "abc"])


def with_resources(tmp_path, resources):
    path = tmp_path / "resources.json"
    path.write_text(json.dumps(resources))
    return str(path)


@pytest.mark.parametrize("limit_mib", [511, 256])
def test_a_limit_below_the_vms_size_is_refused(container, tmp_path, limit_mib):
    runc, _ = container
    path = with_resources(tmp_path, {"memory": {"limit": limit_mib * MIB}, "cpu": {}})
    with pytest.raises(DkvmError) as info:
        memory_limit_check(update_args("--resources", path), runc)
    assert f"memory limit {limit_mib}MiB is below what this VM was sized for when it " \
           "booted (512MiB" in info.value.message
    assert "not set below 512m" in info.value.message


@pytest.mark.parametrize("resources", [{"memory": {"limit": 512 * MIB}},
                                       {"memory": {"limit": 4 << 30}},
                                       {"memory": {"limit": -1}}, {"memory": {}},
                                       {"cpu": {"shares": 512}}, {"pids": {"limit": 10}}])
def test_a_limit_that_holds_the_vm_or_none_passes(container, tmp_path, resources):
    runc, _ = container
    assert memory_limit_check(update_args("-r", with_resources(tmp_path, resources)),
                              runc) is None


def test_resources_on_stdin_are_read_and_handed_back(container):
    runc, _ = container
    for limit, refused in ((128 * MIB, True), (1 << 30, False)):
        data = json.dumps({"memory": {"limit": limit}}).encode()
        read, write = os.pipe()
        os.write(write, data)
        os.close(write)
        try:
            if refused:
                with pytest.raises(DkvmError):
                    memory_limit_check(update_args("--resources", "-"), runc, stdin_fd=read)
            else:
                assert memory_limit_check(update_args("--resources", "-"), runc,
                                          stdin_fd=read) == data
        finally:
            os.close(read)


def test_runcs_memory_flag_is_checked_too(container):
    runc, _ = container
    with pytest.raises(DkvmError, match="memory limit 300MiB"):
        memory_limit_check(update_args("--memory", "300M"), runc)
    assert memory_limit_check(update_args("--memory=1g"), runc) is None


def test_a_container_that_is_not_dkvms_is_runcs(tmp_path):
    """Its root is the image's: a plan.json there is the image's, never read."""
    _, plan = rewrite(load_config("resources-tmpfs-volume"))
    runc, root = stand_in_runc(tmp_path, root="rootfs")
    (root / paths.PLAN_FILE).write_text(plan.to_json())
    path = with_resources(tmp_path, {"memory": {"limit": 64 * MIB}})
    assert memory_limit_check(update_args("-r", path), runc) is None
    with open(runc, "w") as f:
        f.write("#!/bin/sh\necho 'container does not exist' >&2; exit 1\n")
    assert memory_limit_check(update_args("-r", path), runc) is None


def test_malformed_resources_are_left_to_runc(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    assert memory_limit_check(update_args("-r", str(path)), "/nonexistent/runc") is None


@pytest.mark.parametrize("text,value", [("256m", 256 * MIB), ("256M", 256 * MIB),
                                        ("1g", 1 << 30), ("512MiB", 512 * MIB),
                                        ("1048576", 1 << 20), ("12x", None), ("", None)])
def test_runcs_byte_sizes(text, value):
    assert parse_bytes(text) == value


def test_a_plan_that_is_not_dkvms_is_runcs(tmp_path):
    runc, root = stand_in_runc(tmp_path, status="created")
    (root / paths.PLAN_FILE).write_text("{not a plan")
    path = with_resources(tmp_path, {"memory": {"limit": 64 * MIB}})
    assert memory_limit_check(update_args("-r", path), runc) is None
    assert memory_limit_check(update_args("-r", str(tmp_path / "missing")), runc) is None


@pytest.mark.parametrize("kind", ["link", "fifo", "missing"])
def test_a_plan_file_that_is_not_a_regular_file_is_not_followed_nor_opened(tmp_path, kind):
    """A link to a real plan, or a FIFO (which would block an open for reading), where
    the plan should be: the runtime reads neither, and leaves the update to runc."""
    _, plan = rewrite(load_config("resources-tmpfs-volume"))
    runc, root = stand_in_runc(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    handoff.write_plan(str(elsewhere), plan.to_json())
    if kind == "link":
        (root / paths.PLAN_FILE).symlink_to(elsewhere / paths.PLAN_FILE)
    elif kind == "fifo":
        os.mkfifo(root / paths.PLAN_FILE)
    path = with_resources(tmp_path, {"memory": {"limit": 64 * MIB}})
    outcome = []                        # a FIFO opened for reading would block: bounded
    checker = threading.Thread(target=lambda: outcome.append(
        memory_limit_check(update_args("-r", path), runc)), daemon=True)
    checker.start()
    checker.join(10)
    assert outcome == [None]


def test_a_pods_members_limit_is_runcs(tmp_path):
    """A pod's member has no VM (host.pods): its plan's default size is no floor."""
    _, plan = rewrite(load_config("resources-tmpfs-volume"))
    plan.pod = "member"
    runc, root = stand_in_runc(tmp_path)
    handoff.write_plan(str(root), plan.to_json())
    path = with_resources(tmp_path, {"memory": {"limit": 64 * MIB}})
    assert memory_limit_check(update_args("-r", path), runc) is None
    plan.pod = "sandbox"                    # the pod's VM: its floor holds
    handoff.write_plan(str(root), plan.to_json())
    with pytest.raises(DkvmError, match="memory limit 64MiB"):
        memory_limit_check(update_args("-r", path), runc)
