"""rewrite_create_config on the config.json files dockerd really hands to `create`."""
import copy

import pytest

from unitutil import (BUNDLE, CONTAINER_ID, FIXTURE_NAMES, FIXTURES, KERNELS, PAYLOAD_DIR,
                      facts, layout, load_config, rewrite, with_env)
from dkvm.host.bundle import BundleLayout
from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.host.engines import DOCKER
from dkvm.host.container_side import (CONTAINER_SIDE_CAPS, CONTAINER_SIDE_DEVICE_RULES,
                                      CONTAINER_SIDE_MASKED_PATHS,
                                      CONTAINER_SIDE_READONLY_PATHS, container_side_nofile,
                                      container_side_seccomp)
from dkvm.host.rewrite import (CONTAINER_PATH, inert, rewrite_create_config,
                               rewrite_exec_process, rewrite_member_config,
                               with_pod_volumes, workload_capabilities)
from dkvm.host.vm_size import DEFAULT_GUEST_MIB, MIB, vm_footprint_mib
from dkvm.schema import (ENTRYPOINT, MOST_EXECS, MOST_POD_VOLUMES, Capabilities, Disk,
                         ExecRequest, Plan, Rlimit, Tmpfs)

DOCKER_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Docker's default capabilities: full root in the VM, less what it holds back
VM_ROOT = dict(rlimits=[], no_new_privileges=False, oom_score_adj=0,
               capabilities=Capabilities(drop=["CAP_SYS_BOOT"]).as_dict())

# What each fixture's workload was, read off the captured config.json files.
WORKLOADS = {
    "plain": dict(args=["true"], env=[DOCKER_PATH, "HOSTNAME=d53daccee227"], cwd="/",
                  uid=0, gid=0, additional_gids=[0], terminal=False,
                  hostname="d53daccee227", **VM_ROOT),
    "user-workdir-env": dict(args=["true"],
                             env=[DOCKER_PATH, "HOSTNAME=vmhost", "FOO=bar"],
                             cwd="/srv/app", uid=1000, gid=1000,
                             additional_gids=[1000, 2000], terminal=False,
                             hostname="vmhost", **VM_ROOT),
    "resources-tmpfs-volume": dict(args=["true"], env=[DOCKER_PATH, "HOSTNAME=964aa3fda941"],
                                   cwd="/", uid=0, gid=0, additional_gids=[0],
                                   terminal=False, hostname="964aa3fda941", **VM_ROOT),
    "tty-init": dict(args=["/sbin/docker-init", "--", "/bin/sh", "-c", "true"],
                     env=[DOCKER_PATH, "HOSTNAME=cb73b1e1490a", "TERM=xterm"], cwd="/",
                     uid=0, gid=0, additional_gids=[0], terminal=True,
                     hostname="cb73b1e1490a", **VM_ROOT),
    "privileged-cpuset": dict(args=["true"], env=[DOCKER_PATH, "HOSTNAME=a96324e87953"],
                              cwd="/", uid=0, gid=0, additional_gids=[0], terminal=False,
                              hostname="a96324e87953", **VM_ROOT),
    # --cap-drop NET_RAW --ulimit nofile=64:64 --pids-limit 5 --oom-score-adj 100
    # --security-opt no-new-privileges --device /dev/zero:/dev/myzero
    "flags": dict(args=["sleep", "100"], env=[DOCKER_PATH, "HOSTNAME=67b66b4d3045"], cwd="/",
                  uid=0, gid=0, additional_gids=[0], terminal=False, hostname="67b66b4d3045",
                  rlimits=[Rlimit(type="RLIMIT_NOFILE", soft=64, hard=64).as_dict()],
                  no_new_privileges=True, oom_score_adj=100,
                  capabilities=Capabilities(drop=["CAP_NET_RAW", "CAP_SYS_BOOT"]).as_dict()),
    # --cap-drop ALL --cap-add NET_BIND_SERVICE --user 1000
    "cap-drop-all": dict(args=["sleep", "100"], env=[DOCKER_PATH, "HOSTNAME=94350b7b81eb"],
                         cwd="/", uid=1000, gid=1000, additional_gids=[1000, 2000],
                         terminal=False, hostname="94350b7b81eb",
                         **dict(VM_ROOT, capabilities=Capabilities(
                             exact=True, bounding=["CAP_NET_BIND_SERVICE"]).as_dict())),
}
# vCPUs and guest memory each fixture asks for (0 vCPUs: no limit given)
RESOURCES = {
    "plain": (0, DEFAULT_GUEST_MIB),
    "user-workdir-env": (0, DEFAULT_GUEST_MIB),
    "resources-tmpfs-volume": (2, 512 - 112 - 64),  # --cpus 1.5 -m 512m, TCG: 8 execs
    "tty-init": (0, DEFAULT_GUEST_MIB),
    "privileged-cpuset": (1, DEFAULT_GUEST_MIB),  # --cpuset-cpus 0
    "flags": (0, DEFAULT_GUEST_MIB),
    "cap-drop-all": (0, DEFAULT_GUEST_MIB),
}

def destinations(config):
    return [m["destination"] for m in config["mounts"]]


def test_fixture_table_covers_every_fixture():
    on_disk = {p.name[len("config-"):-len(".json")] for p in FIXTURES.glob("config-*.json")}
    assert set(WORKLOADS) == set(FIXTURE_NAMES) == set(RESOURCES) == on_disk


# --- the container's process -------------------------------------------------------

def test_process_runs_the_entrypoint_as_root(any_config):
    _, config = any_config
    new, _ = rewrite(config)
    argv = new["process"]["args"]
    assert argv == paths.role_argv("dkvm-ctr-entrypoint")
    # through the payload's loader and Python, to the role's entry script
    assert argv[0] == "/.dkvm/lib/ld-linux-x86-64.so.2"
    assert argv[-1] == "/.dkvm/entry/dkvm-ctr-entrypoint"
    assert "/.dkvm/python/bin/python3" in argv
    assert new["process"]["user"] == {"uid": 0, "gid": 0}


def test_container_env_is_path_only_the_plan_comes_apart(any_config):
    """The plan (with the workload's env inside) is not an environment string: Linux
    caps one at 128 KiB. It comes back beside the config, for the runtime to write."""
    _, config = any_config
    new, plan = rewrite(config)
    assert new["process"]["env"] == [f"PATH={CONTAINER_PATH}"]
    assert plan.process.env and set(plan.process.env) <= set(config["process"]["env"])


def test_terminal_flag_is_left_to_the_container(any_config):
    name, config = any_config
    new, _ = rewrite(config)
    assert bool(new["process"].get("terminal")) == WORKLOADS[name]["terminal"]


# --- the plan ----------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_plan_holds_the_workload(name):
    _, plan = rewrite(load_config(name))
    want = dict(WORKLOADS[name])
    assert plan.hostname == want.pop("hostname")
    assert plan.process.as_dict() == want
    assert plan.container_id == CONTAINER_ID


def test_plan_leaves_the_entrypoints_fields_to_it(any_config):
    """Which side sets what is the schema's: create sets none of the fields the
    entrypoint owns (it cannot see the container's network or terminal)."""
    _, config = any_config
    _, plan = rewrite(config)
    owned = Plan.fields_set_by(ENTRYPOINT)
    assert owned == ["winsize", "default_rlimits", "interfaces", "network_setup",
                     "wall_clock_ns", "entropy"]
    assert {name: getattr(plan, name) for name in owned} == \
        {name: getattr(Plan(), name) for name in owned}


def test_plan_env_drops_every_dkvm_setting():
    config = with_env(load_config("user-workdir-env"), "DKVM_KERNEL_APPEND=foo.bar=1",
                      "DKVM_DEV_SHM_SIZE=128m", "NOT_DKVM_X=1")
    _, plan = rewrite(config, kvm_usable=True, policy_allows={"DKVM_KERNEL_APPEND"})
    assert plan.process.env == [DOCKER_PATH, "HOSTNAME=vmhost", "FOO=bar", "NOT_DKVM_X=1"]
    assert not any(e.startswith("DKVM_") for e in plan.process.env)
    # and the settings took effect
    assert plan.options.accel == "tcg"          # DKVM_ACCEL=tcg beats a usable KVM
    assert plan.options.kernel_append == "foo.bar=1"
    assert plan.options.dev_shm_size == 128 << 20


def test_plan_options_from_env():
    config = with_env(load_config("plain"), "DKVM_KERNEL=debian/6.1.0-28-amd64",
                      "DKVM_KERNEL_DEBUG=yes", "DKVM_KERNEL_APPEND=init_on_free=1",
                      "DKVM_KERNEL_MOUNT_LIB_MODULES=1")
    _, plan = rewrite(config, policy_allows={"DKVM_KERNEL_APPEND"})
    assert plan.options.kernel == "debian"
    assert plan.boot == KERNELS["debian"]           # the chosen kernel's boot descriptor
    assert plan.options.kernel_debug is True
    assert plan.options.kernel_lib_modules is True
    assert rewrite(load_config("plain"))[1].options.kernel_lib_modules is False
    assert plan.options.kernel_append == "init_on_free=1"
    assert plan.options.dev_shm_size == 64 << 20


def test_plan_survives_json_round_trip(any_config):
    _, config = any_config
    _, plan = rewrite(config)
    assert type(plan).from_json(plan.to_json()) == plan


@pytest.mark.parametrize("kvm_usable,accel", [(True, "kvm"), (False, "tcg")])
def test_auto_accel_follows_kvm(kvm_usable, accel):
    _, plan = rewrite(load_config("plain"), kvm_usable=kvm_usable)
    assert plan.options.accel == accel


# --- the container's root and mounts ----------------------------------------------

CONTAINER_SIDE = ["/proc", "/dev", "/dev/pts", "/sys", "/sys/fs/cgroup", "/dev/mqueue",
                  "/dev/shm"]
DOCKER_FILES = ["/etc/resolv.conf", "/etc/hostname", "/etc/hosts"]
OWN = ["/.dkvm", "/share/dkvm", "/run", "/tmp", "/etc"]


def test_the_containers_root_is_dkvms_own_read_only_skeleton(any_config):
    _, config = any_config
    new, _ = rewrite(config)
    assert new["root"] == {"path": BUNDLE + "/dkvm-root", "readonly": True}
    assert new["process"]["cwd"] == "/"       # the workload's cwd is the guest's business
    assert new["process"]["noNewPrivileges"] is True


@pytest.mark.parametrize("readonly", [False, True])
def test_the_images_root_is_the_first_mount_in_the_export(readonly):
    config = load_config("plain")
    config["root"]["readonly"] = readonly
    new, _ = rewrite(config)
    image = new["mounts"][0]
    assert image == {"destination": "/share/rootfs", "type": "bind",
                     "source": config["root"]["path"],
                     "options": ["rbind", "rprivate", "ro" if readonly else "rw", "nosuid",
                                 "nodev"]}


def test_mounts_for_the_workload_go_into_the_image_in_order_then_the_container_sides():
    config = load_config("resources-tmpfs-volume")
    new, plan = rewrite(config)
    assert plan.tmpfs == [Tmpfs(destination="/scratch",
                                options=["noexec", "nosuid", "nodev", "rprivate", "size=10m",
                                         "mode=1777"])]
    assert destinations(new) == (["/share/rootfs", "/share/rootfs/hosttmp"]
                                 + ["/share/rootfs" + d for d in DOCKER_FILES]
                                 + ["/proc", "/dev", "/dev/pts", "/sys", "/sys/fs/cgroup",
                                    "/dev/mqueue", "/dev/shm"] + OWN)
    volume = new["mounts"][1]
    original = next(m for m in config["mounts"] if m["destination"] == "/hosttmp")
    assert volume == {**original, "destination": "/share/rootfs/hosttmp",
                      "options": original["options"] + ["nosuid", "nodev"]}


def test_every_engine_mount_is_kept_once(any_config):
    _, config = any_config
    new, plan = rewrite(config)
    moved = {t.destination for t in plan.tmpfs}
    kept = [m for m in config["mounts"] if m["destination"] not in moved]
    by_source = [(m["type"], m.get("source"), m.get("options")) for m in new["mounts"]]
    for mount in kept:
        options = mount.get("options")
        if mount["destination"] not in CONTAINER_SIDE:
            options = inert(options)
        assert by_source.count((mount["type"], mount.get("source"), options)) >= 1, mount
    container_side = [m for m in new["mounts"] if m["destination"] in CONTAINER_SIDE]
    assert container_side == [m for m in kept if m["destination"] in CONTAINER_SIDE]


def test_dkvms_own_mounts_come_last_and_cover_the_skeleton(any_config):
    """Whatever a workload mount resolved to, nothing of it is what the container side
    runs or reads: the payload, its tmpfs and an empty /etc are mounted after it."""
    _, config = any_config
    new, _ = rewrite(config)
    own = new["mounts"][-len(OWN):]
    assert [m["destination"] for m in own] == OWN
    for payload in own[:2]:
        assert payload["type"] == "bind" and payload["source"] == PAYLOAD_DIR
        assert "ro" in payload["options"] and "rw" not in payload["options"]
    for tmpfs in own[2:]:
        assert tmpfs["type"] == "tmpfs"
    assert "ro" in own[-1]["options"]                   # /etc: empty and read-only
    assert "mode=700" in own[2]["options"]              # /run: root's only


def test_a_destination_is_resolved_inside_the_image(tmp_path):
    """A link in the image redirects a mount inside the image (as under runc), never
    onto the container side's own root."""
    image = tmp_path / "rootfs"
    (image / "etc").mkdir(parents=True)
    (image / "data").symlink_to("/.dkvm/lib")          # aimed at DKVM's loader
    (image / "etc" / "hosts").symlink_to("../run/hosts")
    config = load_config("plain")
    config["root"]["path"] = str(image)
    config["mounts"].append({"destination": "/data", "type": "bind", "source": "/srv/vol",
                             "options": ["rbind"]})
    new, _ = rewrite_create_config(config, facts(), BundleLayout(str(tmp_path), config))
    dests = destinations(new)
    assert "/share/rootfs/.dkvm/lib" in dests and "/share/rootfs/run/hosts" in dests
    assert dests.count("/.dkvm") == 1 and dests[-len(OWN):] == OWN


@pytest.mark.parametrize("name", [n for n in FIXTURE_NAMES if n != "resources-tmpfs-volume"])
def test_no_tmpfs_in_plan_without_tmpfs_option(name):
    _, plan = rewrite(load_config(name))
    assert plan.tmpfs == []


# --- capabilities and seccomp ------------------------------------------------------

def test_the_container_side_has_exactly_its_own_capabilities(any_config):
    """Whatever the workload was given (--cap-drop ALL included): virtiofsd's and
    NET_ADMIN, nothing more."""
    _, config = any_config
    new, _ = rewrite(config)
    caps = new["process"]["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        assert caps[kind] == CONTAINER_SIDE_CAPS, kind
    assert caps["inheritable"] == caps["ambient"] == []
    assert {"CAP_SYS_CHROOT", "CAP_DAC_OVERRIDE", "CAP_MKNOD", "CAP_NET_ADMIN"} <= \
        set(CONTAINER_SIDE_CAPS)


def test_sys_admin_option_adds_the_capability():
    config = with_env(load_config("plain"), "DKVM_SYS_ADMIN=1")
    new, _ = rewrite(config, policy_allows={"DKVM_SYS_ADMIN"})
    for kind in ("bounding", "effective", "permitted"):
        assert new["process"]["capabilities"][kind].count("CAP_SYS_ADMIN") == 1
    new, _ = rewrite(load_config("plain"))
    assert "CAP_SYS_ADMIN" not in new["process"]["capabilities"]["bounding"]


@pytest.mark.parametrize("bounding,want", [
    (DOCKER.default_capabilities, Capabilities(drop=["CAP_SYS_BOOT"])),
    ([*DOCKER.default_capabilities, "CAP_SYS_BOOT"], Capabilities()),
    ([c for c in DOCKER.default_capabilities if c not in ("CAP_KILL", "CAP_MKNOD")],
     Capabilities(drop=["CAP_KILL", "CAP_MKNOD", "CAP_SYS_BOOT"])),
    (DOCKER.default_capabilities[:7], Capabilities(
        drop=sorted(set(DOCKER.default_capabilities[7:]) | {"CAP_SYS_BOOT"}))),
    (DOCKER.default_capabilities[:6], Capabilities(
        exact=True, bounding=list(DOCKER.default_capabilities[:6]))),
    (["CAP_KILL"], Capabilities(exact=True, bounding=["CAP_KILL"])),
    ([], Capabilities(exact=True)),
    (["CAP_SYS_ADMIN"], Capabilities(exact=True, bounding=["CAP_SYS_ADMIN"])),
])
def test_workload_capabilities_are_full_root_less_what_was_dropped(bounding, want):
    oci = {"bounding": list(bounding)}
    assert workload_capabilities(oci, DOCKER.default_capabilities) == want


def test_no_capabilities_in_the_config_leaves_the_vms_root():
    assert workload_capabilities(None, DOCKER.default_capabilities) == Capabilities()


def test_an_unknown_capability_is_refused_at_create():
    config = load_config("cap-drop-all")
    config["process"]["capabilities"]["bounding"].append("CAP_FROM_THE_FUTURE")
    with pytest.raises(DkvmError, match="--cap-add CAP_FROM_THE_FUTURE: the VM's kernel"):
        rewrite(config)


# --- process settings for the guest ------------------------------------------------

def test_rlimits_go_to_the_guest_not_to_qemu():
    """The workload's limits go to the guest; the container side's only limit is the
    descriptors virtiofsd may hold (container_side_nofile); the engine's own NOFILE
    is recorded for the workload's default."""
    import resource
    config = load_config("flags")
    new, plan = rewrite(config)
    assert new["process"].get("rlimits", []) == container_side_nofile()
    assert plan.process.rlimits == [Rlimit(type="RLIMIT_NOFILE", soft=64, hard=64)]
    assert plan.engine_nofile == list(resource.getrlimit(resource.RLIMIT_NOFILE))


def test_an_unknown_rlimit_is_refused_at_create():
    config = load_config("flags")
    config["process"]["rlimits"].append({"type": "RLIMIT_WHATEVER", "soft": 1, "hard": 1})
    with pytest.raises(DkvmError, match="RLIMIT_WHATEVER"):
        rewrite(config)


def test_pids_limit_counts_in_the_guest_not_on_qemus_threads():
    new, plan = rewrite(load_config("flags"))
    assert "pids" not in new["linux"]["resources"]
    assert plan.pids_limit == 5
    assert rewrite(load_config("plain"))[1].pids_limit == 0


def test_no_new_privileges_for_the_container_side_always_and_the_workload_as_asked():
    for name, asked in (("flags", True), ("plain", False)):
        new, plan = rewrite(load_config(name))
        assert new["process"]["noNewPrivileges"] is True
        assert plan.process.no_new_privileges is asked


def test_exec_relay_has_no_capability_and_its_process_keeps_the_settings():
    process = load_config("flags")["process"]
    process["args"] = ["id"]
    new, request = rewrite_exec_process(process, CONTAINER_ID, DOCKER.default_capabilities, 5)
    assert new["capabilities"] == {kind: [] for kind in ("bounding", "effective",
                                                         "permitted", "inheritable", "ambient")}
    assert "rlimits" not in new
    # the relay's environment is DKVM's; it reads its request from descriptor 5
    assert new["env"] == [f"PATH={CONTAINER_PATH}"]
    assert new["args"] == paths.role_argv("dkvm-exec-relay") + ["--request-fd", "5"]
    assert ExecRequest.from_json(request.to_json()) == request
    assert request.container_id == CONTAINER_ID
    assert request.process.args == ["id"]
    assert request.process.rlimits == [Rlimit(type="RLIMIT_NOFILE", soft=64, hard=64)]
    assert request.process.no_new_privileges is True
    assert request.process.capabilities == Capabilities(drop=["CAP_NET_RAW", "CAP_SYS_BOOT"])


def test_the_container_side_gets_its_seccomp_profile():
    """The engine's profile, with what the container side calls (host.container_side);
    DKVM's own where the engine gave none."""
    config = load_config("plain")
    new, _ = rewrite(config)
    before = config["linux"]["seccomp"]["syscalls"]
    assert new["linux"]["seccomp"]["syscalls"][:len(before)] == before
    assert len(new["linux"]["seccomp"]["syscalls"]) > len(before)
    new, _ = rewrite(load_config("privileged-cpuset"))
    assert new["linux"]["seccomp"] == container_side_seccomp()


def privileged(config):
    """What Docker makes of a config for `--privileged` (daemon/oci_linux.go): every
    host device listed and allowed, /sys and cgroupfs read-write, no masks, no
    seccomp."""
    config = copy.deepcopy(config)
    linux = config["linux"]
    linux["devices"] = [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0,
                         "fileMode": 0o660, "uid": 0, "gid": 6},
                        {"path": "/dev/mem", "type": "c", "major": 1, "minor": 1,
                         "fileMode": 0o640, "uid": 0, "gid": 15}]
    linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    linux["maskedPaths"] = linux["readonlyPaths"] = None
    linux.pop("seccomp")
    for mount in config["mounts"]:
        if mount["destination"] in ("/sys", "/sys/fs/cgroup"):
            mount["options"] = [o for o in mount["options"] if o != "ro"] + ["rw"]
    return config


def container_side_view(config):
    linux = config["linux"]
    return {"masked": linux["maskedPaths"], "readonly": linux["readonlyPaths"],
            "devices": linux["devices"], "rules": linux["resources"]["devices"],
            "mounts": [{**m, "options": sorted(m["options"])} for m in config["mounts"]
                       if m["destination"] in CONTAINER_SIDE],
            "caps": config["process"]["capabilities"],
            "nnp": config["process"]["noNewPrivileges"]}


@pytest.mark.parametrize("kvm_usable", [False, True])
def test_privileged_leaves_the_container_side_as_unprivileged_as_without_it(kvm_usable):
    """`--privileged` is the workload's, in its VM: with QEMU's credentials a writable
    /proc/sys or /sys, or the host's devices, would be the host's."""
    plain = load_config("plain")
    new_plain, _ = rewrite(plain, kvm_usable=kvm_usable)
    new_privileged, plan = rewrite(privileged(plain), kvm_usable=kvm_usable)
    assert container_side_view(new_privileged) == container_side_view(new_plain)
    view = container_side_view(new_privileged)
    for mount in view["mounts"]:
        if mount["destination"] in ("/sys", "/sys/fs/cgroup"):
            assert "ro" in mount["options"] and "rw" not in mount["options"]
    assert {"/proc/sys", "/proc/sysrq-trigger"} <= set(view["readonly"])
    assert {"/proc/kcore", "/sys/firmware", "/sys/devices/virtual/powercap"} <= \
        set(view["masked"])
    assert view["rules"][0] == {"allow": False, "access": "rwm"}
    allowed = {(r["major"], r["minor"]) for r in view["rules"] if r["allow"]}
    assert allowed == {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2),
                       (136, -1), (10, 200)} | ({(10, 232)} if kvm_usable else set())
    assert plan.devices == []               # in the VM: every device of its kernel
    assert plan.process.capabilities.drop == ["CAP_SYS_BOOT"]


# --- devices -----------------------------------------------------------------------

def devices_at(config, path):
    return [d for d in config["linux"].get("devices") or [] if d["path"] == path]


def allow_rules(config, major, minor):
    return [r for r in config["linux"]["resources"]["devices"]
            if r.get("allow") and r.get("type") == "c" and r.get("major") == major
            and r.get("minor") == minor]


def test_tun_device_and_cgroup_rule(any_config):
    _, config = any_config
    new, _ = rewrite(config)
    (tun,) = devices_at(new, "/dev/net/tun")
    assert (tun["type"], tun["major"], tun["minor"]) == ("c", 10, 200)
    (rule,) = allow_rules(new, 10, 200)
    assert rule["access"] == "rwm"
    rules = new["linux"]["resources"]["devices"]
    # after the deny-all rule, which would otherwise win
    assert rules.index(rule) > rules.index({"allow": False, "access": "rwm"})
    assert rules[:len(CONTAINER_SIDE_DEVICE_RULES)] == CONTAINER_SIDE_DEVICE_RULES


@pytest.mark.parametrize("name,kvm_usable,has_kvm", [
    ("plain", True, True),
    ("plain", False, False),
    ("user-workdir-env", True, False),   # DKVM_ACCEL=tcg
    ("tty-init", True, True),
])
def test_kvm_device_only_with_kvm_accel(name, kvm_usable, has_kvm):
    new, plan = rewrite(load_config(name), kvm_usable=kvm_usable)
    assert (plan.options.accel == "kvm") == has_kvm
    kvm = devices_at(new, "/dev/kvm")
    if has_kvm:
        assert [(d["type"], d["major"], d["minor"]) for d in kvm] == [("c", 10, 232)]
        assert len(allow_rules(new, 10, 232)) == 1
    else:
        assert kvm == []
        assert allow_rules(new, 10, 232) == []


# --- resources ---------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_vcpus_and_memory_follow_limits(name):
    _, plan = rewrite(load_config(name))
    assert (plan.cpus, plan.memory_mib) == RESOURCES[name]


def test_the_memory_limit_holds_the_whole_vm():
    """Guest RAM, QEMU's translation cache and the container side's share (with room
    for the execs it may run) add up to the user's limit, which reaches the engine
    unchanged, swap and reservation too."""
    config = load_config("resources-tmpfs-volume")
    config["linux"]["resources"]["memory"]["reservation"] = 256 * MIB
    new, plan = rewrite(config)
    assert new["linux"]["resources"]["memory"] == config["linux"]["resources"]["memory"]
    assert (plan.memory_mib, plan.tcg_cache_mib, plan.max_execs) == (336, 64, 8)
    assert vm_footprint_mib(plan) == 512


def test_no_memory_limit_means_the_default_guest_and_no_limit():
    config = load_config("plain")
    new, plan = rewrite(config)
    assert (plan.memory_mib, plan.max_execs) == (DEFAULT_GUEST_MIB, MOST_EXECS)
    assert new["linux"]["resources"]["memory"] == {"disableOOMKiller": False}


# --- purity ------------------------------------------------------------------------

def test_input_not_mutated(any_config):
    _, config = any_config
    before = copy.deepcopy(config)
    new, _ = rewrite_create_config(config, facts(kvm_usable=True), layout(config))
    assert config == before
    assert new != before


def test_rewrite_is_deterministic(any_config):
    _, config = any_config
    assert rewrite_create_config(config, facts(), layout(config)) == \
        rewrite_create_config(config, facts(), layout(config))


def test_sysctls_and_domainname_go_to_the_plan():
    """dockerd passes --domainname and --sysctl as linux.sysctl; the guest applies them."""
    config = load_config("plain")
    config["linux"]["sysctl"] = {"kernel.domainname": "example.org", "net.ipv4.ip_forward": "1"}
    _, plan = rewrite(config)
    assert plan.sysctl == {"kernel.domainname": "example.org", "net.ipv4.ip_forward": "1"}


# --- --device ----------------------------------------------------------------------

def test_a_device_the_guest_kernel_has_is_made_in_the_guest_not_the_container():
    new, plan = rewrite(load_config("flags"))
    assert devices_at(new, "/dev/myzero") == []
    assert [d.as_dict() for d in plan.devices] == [
        {"path": "/dev/myzero", "type": "c", "major": 1, "minor": 5, "file_mode": 0o666,
         "uid": 0, "gid": 0}]


@pytest.mark.parametrize("device,error", [
    ({"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
     r"--device /dev/sda: the VM's kernel has no driver for b 8:0; the VM has /dev/full"),
    ({"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}, "no driver for c 10:232"),
    ({"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200}, None),
    ({"path": "/dev/loop3", "type": "b", "major": 7, "minor": 3}, None),
])
def test_a_device_the_guest_kernel_lacks_is_refused_at_create(device, error):
    config = load_config("plain")
    config["linux"]["devices"] = [dict(device, fileMode=0o600, uid=0, gid=0)]
    config["linux"]["resources"]["devices"].append(
        {"allow": True, "type": device["type"], "major": device["major"],
         "minor": device["minor"], "access": "rwm"})
    if error:
        with pytest.raises(DkvmError, match=error):
            rewrite(config)
    else:
        assert [d.path for d in rewrite(config)[1].devices] == [device["path"]]


def test_a_device_with_restricted_access_is_refused_at_create():
    """--device /dev/fuse:/dev/fuse:r: in its own kernel the workload is root over it."""
    config = load_config("plain")
    config["linux"]["devices"] = [{"path": "/dev/fuse", "type": "c", "major": 10,
                                   "minor": 229, "fileMode": 0o666, "uid": 0, "gid": 0}]
    config["linux"]["resources"]["devices"].append(
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "r"})
    with pytest.raises(DkvmError, match="--device /dev/fuse:r: the VM cannot restrict"):
        rewrite(config)


def test_privileged_gives_the_guests_own_devices_not_the_hosts():
    """--privileged lists every host device and allows all: in the VM the workload
    has every device of the guest's kernel (its /dev) instead, and nothing fails."""
    config = load_config("plain")
    config["linux"]["devices"] = [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0,
                                   "fileMode": 0o660, "uid": 0, "gid": 6}]
    config["linux"]["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    assert rewrite(config)[1].devices == []


def test_an_engines_own_network_namespace_is_kept_and_given_back():
    """Podman, CRI and `ctr --with-ns` make the namespace and keep it after the
    container: the plan says so; one runc makes goes with the container."""
    config = load_config("plain")
    _, plan = rewrite(config)
    assert not plan.network_namespace_kept
    for ns in config["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = "/var/run/netns/cni-0d9f"
    _, plan = rewrite(config)
    assert plan.network_namespace_kept


def test_masked_and_read_only_paths_in_the_image_go_to_the_guest():
    """Docker's own (all in /proc and /sys) are the VM kernel's: the guest leaves them;
    the container side keeps runc's masks."""
    config = load_config("plain")
    config["linux"]["maskedPaths"] = ["/proc/kcore", "/sys/firmware", "/masked-dir",
                                      "/processes", "/srv/secret"]
    config["linux"]["readonlyPaths"] = ["/proc/sys", "/readonly-file", "/sysroot"]
    config["linux"]["rootfsPropagation"] = "rshared"
    new, plan = rewrite(config)
    assert plan.masked_paths == ["/masked-dir", "/processes", "/srv/secret"]
    assert plan.readonly_paths == ["/readonly-file", "/sysroot"]
    assert plan.root_propagation == "rshared"
    assert new["linux"]["maskedPaths"] == CONTAINER_SIDE_MASKED_PATHS
    assert new["linux"]["readonlyPaths"] == CONTAINER_SIDE_READONLY_PATHS


def test_an_unknown_root_propagation_is_refused_by_name():
    config = load_config("plain")
    config["linux"]["rootfsPropagation"] = "sideways"
    with pytest.raises(DkvmError, match="linux.rootfsPropagation 'sideways': not one of"):
        rewrite(config)


def test_a_user_namespace_is_the_workloads_made_in_the_guest():
    config = load_config("plain")
    config["linux"]["namespaces"].append({"type": "user"})
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    new, plan = rewrite(config)
    assert [(m.container_id, m.host_id, m.size) for m in plan.uid_mappings] == \
        [(0, 100000, 65536)]
    assert [m.host_id for m in plan.gid_mappings] == [200000]
    # the container side stays the host's root: runc is asked for no user namespace
    assert "user" not in [ns["type"] for ns in new["linux"]["namespaces"]]
    assert "uidMappings" not in new["linux"] and "gidMappings" not in new["linux"]
    assert rewrite(load_config("plain"))[1].uid_mappings == []


@pytest.mark.parametrize("namespace, maps, message", [
    ({"type": "user", "path": "/proc/1/ns/user"}, {}, "user namespace given by path"),
    ({"type": "user"}, {"uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]},
     "needs linux.uidMappings and linux.gidMappings"),
    ({"type": "user"}, {"uidMappings": [{"containerID": 0, "size": 1}],
                        "gidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]},
     "each mapping needs containerID, hostID and size"),
])
def test_a_user_namespace_dkvm_cannot_make_is_refused(namespace, maps, message):
    config = load_config("plain")
    config["linux"]["namespaces"].append(namespace)
    config["linux"].update(maps)
    with pytest.raises(DkvmError, match=message):
        rewrite(config)


# --- DKVM_DISKS: the plan's disks (plan_disks) --------------------------------------

def test_disks_go_to_the_plan_with_a_serial_each():
    config = with_env(load_config("plain"), "DKVM_DISKS=/d/a.img,/var/lib/docker,ext4,1g; "
                      "/b.img,/srv/,ext2,64m")
    _, plan = rewrite(config)
    assert plan.disks == [
        Disk(file="/d/a.img", mount_point="/var/lib/docker", filesystem="ext4", size=1 << 30,
             serial="dkvm-disk0"),
        Disk(file="/b.img", mount_point="/srv", filesystem="ext2", size=64 << 20,
             serial="dkvm-disk1")]
    assert rewrite(load_config("plain"))[1].disks == []


def test_the_plan_carries_each_disk_once_as_a_record():
    """DKVM_DISKS is read once, into the records the plan carries: not also as text in
    the plan's options."""
    config = with_env(load_config("plain"), "DKVM_DISKS=/a.img,/data,ext4,64m")
    _, plan = rewrite(config)
    assert plan.to_json().count("/a.img") == 1
    assert not [name for name in plan.options.as_dict() if "disk" in name]


@pytest.mark.parametrize("where,mount,readonly,error", [
    ("/d.img", None, True, "on a read-only path"),
    ("/vol/d.img", {"destination": "/vol", "type": "bind", "source": "/x",
                    "options": ["rbind", "ro"]}, False, "on a read-only path"),
    ("/vol/d.img", {"destination": "/vol", "type": "bind", "source": "/x",
                    "options": ["rbind", "rw"]}, True, None),
    ("/scratch/d.img", {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
                        "options": []}, False, "on a --tmpfs"),
])
def test_a_backing_file_must_be_where_the_container_side_can_write(where, mount, readonly,
                                                                    error):
    config = with_env(load_config("plain"), f"DKVM_DISKS={where},/data,ext4,64m")
    config["root"]["readonly"] = readonly
    if mount:
        config["mounts"].append(mount)
    if error:
        with pytest.raises(DkvmError, match=f"DKVM_DISKS: the file {where} is {error}"):
            rewrite(config)
    else:
        assert [d.file for d in rewrite(config)[1].disks] == [where]


# --- a pod's member (host.pods): a VM's container without the VM ------------------------

def as_member(config):
    """`config` as CRI gives an app container: in its sandbox's network namespace."""
    config = copy.deepcopy(config)
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"]
                                     if ns["type"] != "network"] + [
        {"type": "network", "path": "/proc/4242424/ns/net"}]
    return config


def without(config, *keys):
    """`config` less the dotted `keys` (process.args, linux.resources.devices)."""
    config = copy.deepcopy(config)
    for key in keys:
        *parents, last = key.split(".")
        holder = config
        for parent in parents:
            holder = holder.get(parent) or {}
        holder.pop(last, None)
    return config


# what only a VM has: the member's stay their defaults
VM_PLAN_FIELDS = ("options", "cpus", "memory_mib", "tcg_cache_mib", "max_execs", "boot",
                  "network_namespace_kept", "dns_upstream", "disks")
MEMBER_PLAN_FIELDS = ("pod", "pod_volumes")     # what only a member's has


def test_a_member_is_a_vm_containers_rewrite_without_the_vm(any_config):
    """The same parts make both (the export, the mounts, the confinement, the plan of
    the workload's world); a member's process is the relay, with virtiofsd's
    capabilities, and it gets no device and no VM-sized plan."""
    name, config = any_config
    vm, vm_plan = rewrite(config)
    member, plan = rewrite_member_config(as_member(config), facts(kvm_usable=True),
                                         layout(config), CONTAINER_ID)
    assert member["process"]["args"] == paths.role_argv("dkvm-pod-member")
    assert member["process"]["capabilities"]["bounding"] == []
    assert member["linux"]["devices"] == []
    assert member["linux"]["resources"]["devices"] == CONTAINER_SIDE_DEVICE_RULES
    differ = ("process.args", "process.capabilities", "linux.devices",
              "linux.resources.devices", "linux.namespaces")
    # its volumes are bound again for its relay (with_pod_volumes), after the rest
    member["mounts"] = [m for m in member["mounts"]
                        if not m["destination"].startswith(paths.POD_VOLUMES_DIR + "/")]
    assert without(member, *differ) == without(vm, *differ)
    assert plan.pod == "member" and plan.template == ""
    default = Plan()
    for field in VM_PLAN_FIELDS:
        assert getattr(plan, field) == getattr(default, field), field
    apart = VM_PLAN_FIELDS + MEMBER_PLAN_FIELDS
    assert {k: v for k, v in plan.as_dict().items() if k not in apart} == \
        {k: v for k, v in vm_plan.as_dict().items() if k not in apart}


def test_a_member_shares_the_pods_pid_namespace_when_cri_gives_the_sandboxs():
    config = as_member(load_config("plain"))
    _, alone = rewrite_member_config(config, facts(), layout(config), CONTAINER_ID)
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"]
                                     if ns["type"] != "pid"] + [
        {"type": "pid", "path": "/proc/4242424/ns/pid"}]
    member, shared = rewrite_member_config(config, facts(), layout(config), CONTAINER_ID)
    assert (alone.pod_shares_pid, shared.pod_shares_pid) == (False, True)
    # its relay joins the sandbox's, as runc's process would
    assert {"type": "pid", "path": "/proc/4242424/ns/pid"} in member["linux"]["namespaces"]


def test_a_members_directory_binds_are_its_volumes_bound_again_for_its_relay():
    rootfs = paths.SHARED_ROOTFS
    mounts = [{"destination": rootfs, "type": "bind", "source": "/image"},
              {"destination": rootfs + "/data", "type": "bind", "source": "/kubelet/empty",
               "options": ["rbind", "rw", "nosuid", "nodev"]},
              {"destination": rootfs + "/etc/hosts", "type": "bind", "source": "/k/hosts"},
              {"destination": rootfs + "/tmp/t", "type": "tmpfs", "source": "tmpfs"},
              {"destination": "/run", "type": "tmpfs", "source": "tmpfs"}]
    dirs = {"/image", "/kubelet/empty", "/run"}
    laid, volumes = with_pod_volumes(mounts, is_dir=dirs.__contains__)
    assert laid[:len(mounts)] == mounts
    assert laid[len(mounts):] == [{"destination": paths.POD_VOLUMES_DIR + "/0", "type": "bind",
                                   "source": "/kubelet/empty",
                                   "options": ["rbind", "rw", "nosuid", "nodev"]}]
    assert [v.destination for v in volumes] == ["/data"]
    many = [{"destination": f"{rootfs}/v{n}", "type": "bind", "source": "/kubelet/empty"}
            for n in range(MOST_POD_VOLUMES + 2)]
    assert len(with_pod_volumes(many, is_dir=dirs.__contains__)[1]) == MOST_POD_VOLUMES


def test_a_members_volume_is_in_its_plan_and_bound_for_its_relay(tmp_path):
    config = as_member(load_config("plain"))
    config["mounts"].append({"destination": "/data", "type": "bind", "source": str(tmp_path),
                             "options": ["rbind", "rprivate", "rw"]})
    member, plan = rewrite_member_config(config, facts(), layout(config), CONTAINER_ID)
    assert [v.destination for v in plan.pod_volumes] == ["/data"]
    assert [m["source"] for m in member["mounts"]
            if m["destination"] == paths.POD_VOLUMES_DIR + "/0"] == [str(tmp_path)]


def test_a_member_is_not_given_the_hosts_network_namespace():
    config = load_config("plain")
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"]
                                     if ns["type"] != "network"]
    with pytest.raises(DkvmError, match="--network host is not supported"):
        rewrite_member_config(config, facts(), layout(config), CONTAINER_ID)


def test_an_exec_into_a_member_says_so_in_its_request():
    process = {"args": ["id"], "cwd": "/"}
    _, request = rewrite_exec_process(process, CONTAINER_ID, DOCKER.default_capabilities, 3,
                                      member=True)
    assert request.member is True
    assert rewrite_exec_process(process, CONTAINER_ID, DOCKER.default_capabilities,
                                3)[1].member is False
