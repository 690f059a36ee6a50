"""Rewriting the OCI config.json that dockerd hands to `create`: pure, dict in, dict out.

The container becomes the VM's host side: it runs DKVM's entrypoint as root with the
few extra privileges QEMU and virtiofsd need, and everything the workload was to be
given (args, env, user, cwd, tmpfs mounts, hostname) moves into the plan for the guest.
"""
import copy
import json
import math
import os
from dataclasses import dataclass, field

from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.options import parse_options, split_env
from dkvm.plan import PLAN_ENV, Plan

MIB = 1 << 20
DEFAULT_GUEST_MIB = 1024
MIN_GUEST_MIB = 192
# Memory the container needs beyond guest RAM: QEMU itself, virtiofsd and the
# entrypoint. Measured under TCG (-m 256m, guest RAM filled): 117 MiB beyond guest
# RAM; the margin is for TCG's translation cache, which grows with the code run.
QEMU_OVERHEAD_MIB = 384
EXTRA_CAPS = ["CAP_NET_ADMIN"]
CLONE_FS = 0x200
TUN = {"path": "/dev/net/tun", "major": 10, "minor": 200}
KVM = {"path": "/dev/kvm", "major": 10, "minor": 232}
# tmpfs mounts the runtime itself sets up in every container; others are the user's.
SYSTEM_TMPFS = {"/dev", "/dev/shm", "/run/secrets", "/dev/pts", "/dev/mqueue", "/sys/fs/cgroup"}
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class HostFacts:
    """What the rewrite needs to know about the host, gathered by the caller."""
    payload_dir: str
    kvm_usable: bool
    kernels: dict                      # dist -> release
    defaults: dict = field(default_factory=dict)   # from the runtime's own args
    dns_upstream: list = field(default_factory=list)  # the host's name servers


def rewrite_create_config(config, host):
    """Return the config for the container that boots the VM running `config`'s process."""
    config = copy.deepcopy(config)
    process = config.get("process") or {}
    linux = config.setdefault("linux", {})
    workload_env, settings = split_env(process.get("env") or [])
    opts = parse_options(settings, host.kernels, host.defaults)
    resources = linux.setdefault("resources", {})
    accel = choose_accel(opts.accel, host.kvm_usable)
    check_network_namespace(linux)

    plan = Plan(
        args=list(process.get("args") or []),
        env=workload_env,
        cwd=process.get("cwd") or "/",
        uid=process.get("user", {}).get("uid", 0),
        gid=process.get("user", {}).get("gid", 0),
        additional_gids=list(process.get("user", {}).get("additionalGids") or []),
        terminal=bool(process.get("terminal")),
        hostname=config.get("hostname", ""),
        domainname=config.get("domainname", ""),
        accel=accel,
        cpus=vcpus_for(resources.get("cpu") or {}),
        memory_mib=plan_memory(resources),
        kernel=opts.kernel,
        kernel_append=opts.kernel_append,
        kernel_debug=opts.kernel_debug,
        kernel_lib_modules=opts.kernel_lib_modules,
        dev_shm_size=opts.dev_shm_size,
        sysctl=dict(linux.get("sysctl") or {}),
        dns_upstream=list(host.dns_upstream),
    )
    config["mounts"], plan.tmpfs = split_user_tmpfs(config.get("mounts") or [])
    config["mounts"] += payload_mounts(host.payload_dir)

    process["args"] = paths.role_argv("dkvm-ctr-entrypoint")
    process["env"] = [f"PATH={CONTAINER_PATH}", f"{PLAN_ENV}={plan.to_json()}"]
    process["user"] = {"uid": 0, "gid": 0}
    add_capabilities(process, EXTRA_CAPS + (["CAP_SYS_ADMIN"] if opts.sys_admin else []))
    allow_unshare_clone_fs(linux)
    add_device(linux, TUN)
    if accel == "kvm":
        add_device(linux, KVM)
    config["process"] = process
    return config


EXEC_ENV = "DKVM_EXEC"


def rewrite_exec_process(process):
    """Return the process.json for `runc exec` that relays `process` into the guest.
    The relay runs as root in the container (it talks to the container side's
    control multiplexer); the user, env, cwd and terminal go to the guest."""
    process = copy.deepcopy(process)
    user = process.get("user") or {}
    env, _ = split_env(process.get("env") or [])
    request = {
        "args": list(process.get("args") or []),
        "env": env,
        "cwd": process.get("cwd") or "/",
        "uid": user.get("uid", 0),
        "gid": user.get("gid", 0),
        "additional_gids": list(user.get("additionalGids") or []),
        "terminal": bool(process.get("terminal")),
    }
    process["args"] = paths.role_argv("dkvm-exec")
    process["env"] = [f"PATH={CONTAINER_PATH}",
                      f"{EXEC_ENV}={json.dumps(request, separators=(',', ':'))}"]
    process["user"] = {"uid": 0, "gid": 0}
    process["cwd"] = "/"
    add_capabilities(process, [])
    return process


def check_network_namespace(linux):
    """The VM takes over the container's interfaces: it needs a namespace of its own."""
    namespaces = linux.get("namespaces") or []
    net = [ns for ns in namespaces if ns.get("type") == "network"]
    # dockerd names the host's namespace .../netns/default; other engines omit it
    if not net or os.path.basename(net[0].get("path") or "") == "default":
        raise DkvmError("--network host is not supported by DKVM: the VM needs a network "
                        "namespace of its own (use a bridge network, or --network none)")
    if net[0].get("path"):
        raise DkvmError("--network container:NAME is not supported by DKVM: the VM needs a "
                        "network namespace of its own (use a bridge network, or --network none)")


def choose_accel(wanted, kvm_usable):
    if wanted == "auto":
        return "kvm" if kvm_usable else "tcg"
    if wanted == "kvm" and not kvm_usable:
        raise DkvmError("DKVM_ACCEL=kvm but KVM is not usable on this host "
                        "(no /dev/kvm, or nested PVM that cannot boot a stock kernel): "
                        "use DKVM_ACCEL=tcg or auto")
    return wanted


def vcpus_for(cpu):
    """`--cpus N` is a CFS quota; `--cpuset-cpus` a list. 0 means: no limit given."""
    quota, period = cpu.get("quota") or 0, cpu.get("period") or 100000
    counts = []
    if quota > 0:
        counts.append(max(1, math.ceil(quota / period)))
    if cpu.get("cpus"):
        counts.append(len(parse_cpuset(cpu["cpus"])))
    return min(counts) if counts else 0


def parse_cpuset(text):
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def plan_memory(resources):
    """Guest RAM is the container's memory limit; the limit itself grows by QEMU's
    overhead so the guest gets all of what the user asked for."""
    memory = resources.get("memory") or {}
    limit = memory.get("limit") or 0
    if limit <= 0:
        return DEFAULT_GUEST_MIB
    guest_mib = limit // MIB
    if guest_mib < MIN_GUEST_MIB:
        raise DkvmError(f"memory limit {guest_mib}MiB (--memory) is too small to boot a VM: "
                        f"use at least {MIN_GUEST_MIB}m")
    memory["limit"] = limit + QEMU_OVERHEAD_MIB * MIB
    if (memory.get("swap") or 0) > 0:
        memory["swap"] += QEMU_OVERHEAD_MIB * MIB
    if (memory.get("reservation") or 0) > memory["limit"]:
        memory["reservation"] = memory["limit"]
    return guest_mib


def split_user_tmpfs(mounts):
    """`--tmpfs` mounts belong in the guest, not in the container."""
    keep, moved = [], []
    for mount in mounts:
        if mount.get("type") == "tmpfs" and mount.get("destination") not in SYSTEM_TMPFS:
            moved.append({"destination": mount["destination"],
                          "options": list(mount.get("options") or [])})
        else:
            keep.append(mount)
    return keep, moved


def payload_mounts(payload_dir):
    return [
        {"destination": paths.PAYLOAD_MOUNT, "type": "bind", "source": payload_dir,
         "options": ["rbind", "ro", "nosuid", "nodev"]},
        {"destination": paths.RUN_DIR, "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=700", "size=16m"]},
    ]


def add_capabilities(process, caps):
    """The entrypoint runs as root, so it gets what root gets in this container: the
    whole bounding set, plus `caps`. (For a non-root --user, dockerd leaves effective
    and permitted empty, which would leave virtiofsd without CAP_SYS_CHROOT & co.)"""
    capabilities = process.setdefault("capabilities", {})
    bounding = capabilities.setdefault("bounding", [])
    bounding.extend(c for c in caps if c not in bounding)
    for kind in ("effective", "permitted"):
        current = capabilities.setdefault(kind, [])
        current.extend(c for c in bounding if c not in current)


def allow_unshare_clone_fs(linux):
    """virtiofsd's chroot sandbox calls unshare(CLONE_FS); Docker's default seccomp
    profile only allows unshare with CAP_SYS_ADMIN. Allow exactly that one call."""
    seccomp = linux.get("seccomp")
    if not seccomp:
        return
    seccomp.setdefault("syscalls", []).append({
        "names": ["unshare"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": CLONE_FS, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
    })


def add_device(linux, dev):
    devices = linux.setdefault("devices", [])
    if not any(d.get("path") == dev["path"] for d in devices):
        devices.append({"path": dev["path"], "type": "c", "major": dev["major"],
                        "minor": dev["minor"], "fileMode": 0o666, "uid": 0, "gid": 0})
    rules = linux.setdefault("resources", {}).setdefault("devices", [])
    rules.append({"allow": True, "type": "c", "major": dev["major"], "minor": dev["minor"],
                  "access": "rwm"})
