"""What the container side (QEMU, virtiofsd, the entrypoint) gets whatever the engine
gave the workload (host.container_side): its descriptor limit, its view of /proc,
/sys and the host's devices, its seccomp profile, its device nodes."""
import copy

import pytest

from unitutil import FIXTURE_NAMES, load_config
from dkvm.host.container_side import (CONTAINER_SIDE_DEVICE_RULES, CONTAINER_SIDE_MASKED_PATHS,
                                      TUN, add_device, allow_container_side_syscalls,
                                      confine_container_side, container_side_nofile,
                                      container_side_seccomp)


# --- the descriptor limit ----------------------------------------------------------

def capabilities_status(tmp_path, effective):
    status = tmp_path / "status"
    status.write_text(f"Name:\tdkvm\nCapInh:\t0000000000000000\nCapEff:\t{effective}\n")
    return str(status)


def test_the_container_sides_descriptor_limit_is_what_the_host_allows(tmp_path):
    """As many descriptors as fs.nr_open allows, where runc can raise the limit (root
    with CAP_SYS_RESOURCE); where it cannot (this machine's root lacks it), the
    engine's, as before: raising it would fail every create."""
    nr_open = tmp_path / "nr_open"
    nr_open.write_text("4194304\n")
    full = capabilities_status(tmp_path, "000001ffffffffff")
    assert container_side_nofile(str(nr_open), full) == [
        {"type": "RLIMIT_NOFILE", "soft": 4194304, "hard": 4194304}]
    assert container_side_nofile(str(tmp_path / "none"), full)[0]["hard"] >= 1 << 20
    without = capabilities_status(tmp_path, "000001fffeffffff")     # no CAP_SYS_RESOURCE
    assert container_side_nofile(str(nr_open), without) == []


# --- its view of the host ----------------------------------------------------------

def test_the_engines_own_masks_on_proc_and_sys_are_kept_for_the_container_side():
    """Podman masks more of /proc and /sys than Docker: the container side keeps them;
    masks elsewhere are the image's (the guest's)."""
    config = load_config("plain")
    config["linux"]["maskedPaths"] += ["/proc/interrupts", "/sys/fs/selinux", "/srv/secret"]
    confine_container_side(config)
    assert config["linux"]["maskedPaths"] == CONTAINER_SIDE_MASKED_PATHS + [
        "/proc/interrupts", "/sys/fs/selinux"]


def test_the_engines_device_rules_are_not_the_container_sides():
    """`--device-cgroup-rule` and `--device` are the workload's: the guest makes its
    devices; the host's stay closed to QEMU."""
    config = load_config("plain")
    config["linux"]["resources"]["devices"].append(
        {"allow": True, "type": "b", "major": 8, "minor": -1, "access": "rwm"})
    confine_container_side(config)
    assert config["linux"]["resources"]["devices"] == CONTAINER_SIDE_DEVICE_RULES


def test_sysfs_and_cgroupfs_are_read_only_for_the_container_side():
    config = load_config("plain")
    for mount in config["mounts"]:
        if mount["destination"] in ("/sys", "/sys/fs/cgroup"):
            mount["options"] = [o for o in mount["options"] if o != "ro"] + ["rw"]
    confine_container_side(config)
    for mount in config["mounts"]:
        if mount["destination"] in ("/sys", "/sys/fs/cgroup"):
            assert "ro" in mount["options"] and "rw" not in mount["options"]


def test_a_device_and_its_rule_are_added_once():
    """A config that already has the device and its rule (a second `create` from a
    rewritten bundle, `--device /dev/net/tun`) gets neither twice."""
    linux = {}
    add_device(linux, TUN)
    assert [(d["path"], d["type"], d["major"], d["minor"]) for d in linux["devices"]] == \
        [("/dev/net/tun", "c", 10, 200)]
    assert linux["resources"]["devices"] == [
        {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rwm"}]
    again = copy.deepcopy(linux)
    add_device(again, TUN)
    assert again == linux


# --- seccomp -----------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in FIXTURE_NAMES if n != "privileged-cpuset"])
def test_seccomp_allows_what_virtiofsd_and_the_entrypoint_need(name):
    linux = load_config(name)["linux"]
    before = copy.deepcopy(linux["seccomp"])
    allow_container_side_syscalls(linux)
    seccomp = linux["seccomp"]
    after = seccomp["syscalls"]
    assert after[:len(before["syscalls"])] == before["syscalls"]
    assert after[len(before["syscalls"]):] == [
        {"names": ["chroot", "pidfd_open", "process_madvise"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["unshare"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 0x200, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]}]
    # the rest of the profile is untouched
    assert {k: v for k, v in seccomp.items() if k != "syscalls"} == \
        {k: v for k, v in before.items() if k != "syscalls"}


def test_a_profile_that_does_not_name_clone3_answers_it_enosys():
    """glibc falls back to clone on ENOSYS; on the default EPERM, QEMU's and
    virtiofsd's threads would not start. A profile that names clone3, or allows what
    it does not name, is left as it is."""
    linux = load_config("plain")["linux"]
    linux["seccomp"]["syscalls"] = [
        rule for rule in linux["seccomp"]["syscalls"] if rule["names"] != ["clone3"]]
    allowing = copy.deepcopy(linux)
    allow_container_side_syscalls(linux)
    assert linux["seccomp"]["syscalls"][-1] == {
        "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    allowing["seccomp"]["defaultAction"] = "SCMP_ACT_ALLOW"
    allow_container_side_syscalls(allowing)
    assert not [r for r in allowing["seccomp"]["syscalls"] if "clone3" in r["names"]]


def test_without_a_profile_nothing_is_added():
    linux = load_config("privileged-cpuset")["linux"]
    before = copy.deepcopy(linux)
    allow_container_side_syscalls(linux)
    assert linux == before


def test_a_container_side_the_engine_left_without_seccomp_gets_dkvms_deny_list():
    """`--privileged` and `seccomp=unconfined` are the workload's, in its VM: the
    container side gets a profile that refuses what it never calls."""
    seccomp = container_side_seccomp()
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    assert set(seccomp["architectures"]) == {"SCMP_ARCH_X86_64", "SCMP_ARCH_X86",
                                             "SCMP_ARCH_X32"}
    denied = {name for rule in seccomp["syscalls"] if not rule.get("args")
              and rule["action"] == "SCMP_ACT_ERRNO" for name in rule["names"]}
    assert {"kexec_load", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key",
            "mount", "umount2", "pivot_root", "init_module", "finit_module", "ptrace",
            "open_by_handle_at", "setns", "io_uring_setup", "clone3"} <= denied
    # what virtiofsd, QEMU and the entrypoint call stays allowed
    assert not denied & {"chroot", "unshare", "clone", "process_madvise", "pidfd_open",
                         "name_to_handle_at", "seccomp", "prctl", "mknod", "fchownat"}
    by_flag = {(rule["names"][0], rule["args"][0]["value"]) for rule in seccomp["syscalls"]
               if rule.get("args")}
    clone_newnet, clone_newuser, clone_newns, clone_fs = 0x40000000, 0x10000000, 0x20000, 0x200
    assert {("unshare", clone_newnet), ("unshare", clone_newuser), ("unshare", clone_newns),
            ("clone", clone_newnet), ("clone", clone_newuser)} <= by_flag
    assert ("unshare", clone_fs) not in by_flag
    for rule in seccomp["syscalls"]:
        for arg in rule.get("args") or []:
            assert arg["op"] == "SCMP_CMP_MASKED_EQ" and arg["value"] == arg["valueTwo"]
