"""Rewriting the OCI config.json that dockerd hands to `create`: pure, dict in, dict out.

The container becomes the VM's host side: it runs DKVM's entrypoint as root with the
few extra privileges QEMU and virtiofsd need, and everything the workload was to be
given (args, env, user, cwd, tmpfs mounts, hostname) moves into the plan for the guest.

Its root is DKVM's own, not the image's (paths): a read-only skeleton of mount points
with the payload and private tmpfs, so that nothing the container side runs or reads
comes from the image. The image's root goes to paths.SHARED_ROOTFS, the directory
virtiofsd exports, and every mount meant for the workload (volumes, binds, Docker's
/etc files) goes into it at the place its destination really names in the image
(symlinks resolved inside the image, as runc resolves them in a container's root).
The mounts that the container side keeps (proc, sys, dev) and DKVM's own come after
them, so that nothing mounted for the workload can cover what the container side
uses.
"""
import copy
import math

from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.host.devices import guest_devices
from dkvm.kernel_names import CAPABILITY_NUMBERS, RLIM_INFINITY
from dkvm.options import IMAGE_KERNEL, parse_settings, split_env
from dkvm.schema import (CAPABILITY_SETS, MOST_EXECS, ROOT_PROPAGATIONS, Boot, Capabilities,
                         ExecRequest, IdMapping, Options, Plan, Process, Rlimit, Tmpfs)

MIB = 1 << 20
DEFAULT_GUEST_MIB = Plan.FIELDS["memory_mib"].default
MIN_GUEST_MIB = 128
# What the container needs beside guest RAM, inside its memory limit: QEMU's own
# memory (heap, threads, device state), virtiofsd and the entrypoint. Measured under
# TCG with guest RAM filled: 48 MiB of anonymous memory; the rest is headroom (the
# entrypoint's exec queues: 3/4 MiB an exec), and file pages (the payload's code) are
# reclaimable.
VM_SIDE_MIB = 80
# Each `docker exec` is a relay process in the container: 3.9 MiB each measured (the
# cgroup's usage with 10 relays running; 3.4 MiB of it their own anonymous memory, the
# rest kernel and shared code). A container runs an exec per EXEC_SHARE_MIB of its
# limit at once, at least MIN_EXECS, at most schema.MOST_EXECS (and that many without
# a limit): their room comes out of the limit, and a small VM is not made smaller
# still for execs it never runs (`-m 256m`: 4 execs, 16 MiB; `-m 1g`: 16, 64 MiB).
EXEC_RELAY_MIB = 4
EXEC_SHARE_MIB, MIN_EXECS = 64, 4
NR_OPEN_DEFAULT = 1 << 20   # the kernel's fs.nr_open unless the host changed it
# Under TCG, QEMU's translation cache grows with the code the guest runs, up to
# 1 GiB by default: it is sized to the limit (an eighth, 32-256 MiB; 256 without
# one), so that the VM has a size a limit can hold. Smaller is slower for big
# workloads (systemd and dockerd inside: 75 s at 32 MiB, 54 s at 1 GiB).
TCG_CACHE_SHARE, TCG_CACHE_MIN_MIB, TCG_CACHE_MAX_MIB = 8, 32, 256
# The container side's capabilities, whatever the workload was given: virtiofsd's
# (it serves files as their owners: CHOWN to SETFCAP; SYS_CHROOT, SETPCAP for its
# sandbox), NET_ADMIN for the taps, SYS_NICE to page QEMU's copy of the kernel out
# once the guest runs (processes.release_kernel_image). The workload's own go to
# the guest.
CONTAINER_SIDE_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID",
                       "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_SETFCAP",
                       "CAP_MKNOD", "CAP_SYS_CHROOT", "CAP_NET_ADMIN", "CAP_SYS_NICE"]
# What the VM keeps from the workload's full root unless the config grants it:
# reboot() from the workload ends the container (the guest kernel kills its PID
# namespace); under runc it fails for want of SYS_BOOT, and systemd exits 0 instead.
WITHHELD_CAPS = {"CAP_SYS_BOOT"}
CLONE_FS = 0x200
ENOSYS = 38
CLONE3_FALLBACK = {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}
TUN = {"path": "/dev/net/tun", "major": 10, "minor": 200}
KVM = {"path": "/dev/kvm", "major": 10, "minor": 232}
# The container side's view of the host kernel is the same with or without
# `--privileged` (which is the workload's, in its VM: the engine then clears the
# masks, mounts /sys and cgroupfs read-write, allows every device and drops seccomp;
# with QEMU's credentials that would open core_pattern and /sys/power/state). Its
# masked and read-only paths: Docker's defaults, and any more the engine has there.
CONTAINER_SIDE_MASKED_PATHS = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                               "/proc/latency_stats", "/proc/timer_list",
                               "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                               "/sys/firmware", "/sys/devices/virtual/powercap"]
CONTAINER_SIDE_READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                                 "/proc/sysrq-trigger"]
# the engine's mounts of the host's sysfs and cgroupfs, read-only for the container side
READ_ONLY_MOUNTS = {"/sys", "/sys/fs/cgroup"}
# The devices the container side opens, after a deny-all: /dev's basics and its
# terminal (runc adds the same defaults itself), then TUN and KVM (add_device).
CONTAINER_SIDE_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
                          "urandom": (1, 9), "tty": (5, 0), "console": (5, 1),
                          "ptmx": (5, 2), "pts/*": (136, -1)}
CONTAINER_SIDE_DEVICE_RULES = [{"allow": False, "access": "rwm"}] + [
    {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
    for major, minor in CONTAINER_SIDE_DEVICES.values()]
# The container side's seccomp profile when the engine gives none (`--privileged`,
# `--security-opt seccomp=unconfined`). A deny list, not Docker's allow list: what it
# refuses is what reaches the host kernel past the container side's capabilities
# (keyrings, perf, bpf, userfaultfd, io_uring, ptrace, new namespaces, mounts,
# modules, clocks, kexec...), while QEMU, virtiofsd (chroot, unshare(CLONE_FS)) and
# the entrypoint keep every call they make; QEMU adds its own -sandbox. io_uring is
# only QEMU's fast path (it falls back to ppoll). The 32-bit ABIs an x86_64 process
# can call are filtered too, or they would go around the list.
DENIED_SYSCALLS = [
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
    "delete_module", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick",
    "get_kernel_syms", "init_module", "io_uring_enter", "io_uring_register",
    "io_uring_setup", "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl",
    "lookup_dcookie", "mount", "mount_setattr", "move_mount", "nfsservctl",
    "open_by_handle_at", "open_tree", "perf_event_open", "pivot_root", "process_vm_readv",
    "process_vm_writev", "ptrace", "query_module", "quotactl", "quotactl_fd", "reboot",
    "request_key", "setns", "settimeofday", "stime", "swapoff", "swapon", "syslog", "sysfs",
    "_sysctl", "umount", "umount2", "uselib", "userfaultfd", "ustat", "vhangup", "vm86",
    "vm86old"]
EPERM = 1
# clone and unshare flags that make namespaces (CLONE_NEWTIME only means one to unshare)
NAMESPACE_FLAGS = {"clone": [0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000,
                             0x20000000, 0x40000000],
                   "unshare": [0x80, 0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000,
                               0x20000000, 0x40000000]}
SECCOMP_ARCHITECTURES = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
# tmpfs mounts the runtime itself sets up in every container; others are the user's.
SYSTEM_TMPFS = {"/dev", "/dev/shm", "/run/secrets", "/dev/pts", "/dev/mqueue", "/sys/fs/cgroup"}
# the engine's mounts the container side keeps for itself (the guest has its own)
CONTAINER_SIDE_MOUNTS = {"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys",
                         "/sys/fs/cgroup"}
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def rewrite_create_config(config, host, bundle, container_id=""):
    """Return the config for the container that boots the VM running `config`'s
    process, and the plan its entrypoint is to read from its root (handoff); `host` is
    a host.facts.HostFacts, `bundle` a host.bundle.BundleLayout (where the container's
    own root is, and how a path resolves in the image)."""
    config = copy.deepcopy(config)
    process = config.get("process") or {}
    linux = config.setdefault("linux", {})
    workload_env, settings = split_env(process.get("env") or [])
    values = parse_settings(settings, host, host.defaults, host.policy_allows)
    options = Options(**{name: values[name] for name in Options.FIELDS})
    options.accel = choose_accel(options.accel, host.kvm_usable)
    netns_path = host.engine.check_network_namespace(linux)
    resources = linux.setdefault("resources", {})
    uid_mappings, gid_mappings = take_user_namespace(linux)

    plan = Plan(
        container_id=container_id,
        process=process_spec(process, workload_env, host.engine.default_capabilities),
        options=options,
        cpus=vcpus_for(resources.get("cpu") or {}),
        boot=choose_boot(options.kernel, host.kernels, bundle),
        hostname=config.get("hostname", ""),
        domainname=config.get("domainname", ""),
        network_namespace_kept=bool(netns_path),
        sysctl=dict(linux.get("sysctl") or {}),
        dns_upstream=list(host.dns_upstream),
        readonly_root=bool((config.get("root") or {}).get("readonly")),
        masked_paths=guest_paths(linux.get("maskedPaths")),
        readonly_paths=guest_paths(linux.get("readonlyPaths")),
        root_propagation=root_propagation(linux.get("rootfsPropagation")),
        uid_mappings=uid_mappings,
        gid_mappings=gid_mappings,
        devices=guest_devices(linux),
        pids_limit=take_pids_limit(resources),
    )
    plan.memory_mib, plan.tcg_cache_mib, plan.max_execs = plan_memory(resources,
                                                                       options.accel)
    plan.disks = plan_disks(values["disks"], config.get("mounts") or [], plan.readonly_root)
    mounts, plan.tmpfs = split_user_tmpfs(config.get("mounts") or [])
    config["mounts"] = lay_out_mounts(mounts, bundle.image_root, plan.readonly_root,
                                      host.payload_dir, bundle.resolve)
    config["root"] = {"path": bundle.skeleton, "readonly": True}

    process["args"] = paths.role_argv("dkvm-ctr-entrypoint")
    process["cwd"] = "/"
    process["env"] = [f"PATH={CONTAINER_PATH}"]     # the plan is a file: handoff
    process["user"] = {"uid": 0, "gid": 0}
    process["noNewPrivileges"] = True
    process["rlimits"] = container_side_nofile()
    plan.engine_nofile = engine_nofile()
    set_capabilities(process, CONTAINER_SIDE_CAPS + (["CAP_SYS_ADMIN"] if options.sys_admin
                                                     else []))
    linux["devices"] = []               # the workload's are made in the guest
    confine_container_side(config)
    allow_container_side_syscalls(linux)
    if not linux.get("seccomp"):
        linux["seccomp"] = container_side_seccomp()
    add_device(linux, TUN)
    if options.accel == "kvm":
        add_device(linux, KVM)
    config["process"] = process
    return config, plan


def rewrite_exec_process(process, container_id, engine_capabilities, request_fd):
    """Return the process.json for `runc exec` that relays `process` into the guest,
    and the relay's request, which it reads from descriptor `request_fd` (handoff).
    The relay runs as root in the container with no capability (it only talks to the
    container side's control multiplexer, in root's /run); the user, env, cwd,
    terminal and limits go to the guest."""
    process = copy.deepcopy(process)
    env, _ = split_env(process.get("env") or [])
    request = ExecRequest(container_id=container_id,
                          process=process_spec(process, env, engine_capabilities))
    process["args"] = paths.role_argv("dkvm-exec") + [paths.EXEC_REQUEST_FD, str(request_fd)]
    process["env"] = [f"PATH={CONTAINER_PATH}"]
    process["user"] = {"uid": 0, "gid": 0}
    process["cwd"] = "/"
    process["noNewPrivileges"] = True
    process.pop("rlimits", None)
    set_capabilities(process, [])
    return process, request


def process_spec(process, env, engine_capabilities):
    """The guest's copy of an OCI process (the workload's, or an exec's)."""
    user = process.get("user") or {}
    return Process(args=list(process.get("args") or []), env=list(env),
                   cwd=process.get("cwd") or "/", uid=user.get("uid", 0),
                   gid=user.get("gid", 0),
                   additional_gids=list(user.get("additionalGids") or []),
                   terminal=bool(process.get("terminal")),
                   rlimits=rlimits(process.get("rlimits") or []),
                   no_new_privileges=bool(process.get("noNewPrivileges")),
                   capabilities=workload_capabilities(process.get("capabilities"),
                                                      engine_capabilities),
                   oom_score_adj=process.get("oomScoreAdj") or 0)


def rlimits(oci_rlimits):
    try:
        return [Rlimit.from_dict(limit, "--ulimit") for limit in oci_rlimits]
    except ValueError as err:
        raise DkvmError(f"{err}: the VM's kernel has no such limit") from None


def workload_capabilities(oci, engine_default):
    """The workload keeps the VM's full root (systemd and Docker inside need it) less
    what the user dropped from the engine's default set. The config only shows what
    is left: with most of the default set gone, as after `--cap-drop ALL` (and the
    odd `--cap-add`), the user wants a minimal set, and gets exactly runc's."""
    if oci is None:
        return Capabilities()
    bounding, default = set(oci.get("bounding") or []), set(engine_default)
    if 2 * len(bounding & default) >= len(default):
        return Capabilities(drop=sorted((default | WITHHELD_CAPS) - bounding))
    sets = {name: list(oci.get(name) or []) for name in CAPABILITY_SETS}
    unknown = sorted({cap for caps in sets.values() for cap in caps} - set(CAPABILITY_NUMBERS))
    if unknown:
        raise DkvmError(f"--cap-add {', '.join(unknown)}: the VM's kernel has no such "
                        "capability")
    return Capabilities(exact=True, **sets)


def guest_paths(paths_in_config):
    """The masked or read-only paths the guest applies: those in the image's tree.
    /proc and /sys in the VM are its own kernel's, the workload's to use (systemd and
    dockerd inside write /proc/sys); the container side keeps runc's masks."""
    return [path for path in paths_in_config or []
            if not any(path == top or path.startswith(top + "/") for top in ("/proc", "/sys"))]


def root_propagation(value):
    if value and value not in ROOT_PROPAGATIONS:
        raise DkvmError(f"linux.rootfsPropagation {value!r}: not one of "
                        f"{', '.join(ROOT_PROPAGATIONS)}")
    return value or ""


def take_user_namespace(linux):
    """A user namespace is the workload's: the guest makes it, with the config's
    mappings, so that the guest's kernel maps the ids the export shows. The container
    side (QEMU, virtiofsd, taps) stays the host's root, and runc is not asked for one."""
    namespaces = linux.get("namespaces") or []
    user = [ns for ns in namespaces if ns.get("type") == "user"]
    if not user:
        return [], []
    if user[0].get("path"):
        raise DkvmError("a user namespace given by path is not supported by DKVM: the "
                        "workload's is made in the VM, from linux.uidMappings and gidMappings")
    try:
        maps = [[IdMapping.from_dict({"container_id": m.get("containerID"),
                                      "host_id": m.get("hostID"), "size": m.get("size")},
                                     f"linux.{key}") for m in linux.get(key) or []]
                for key in ("uidMappings", "gidMappings")]
    except (AttributeError, ValueError) as err:
        raise DkvmError(f"{err}: each mapping needs containerID, hostID and size") from None
    if not all(maps):
        raise DkvmError("a user namespace needs linux.uidMappings and linux.gidMappings")
    linux["namespaces"] = [ns for ns in namespaces if ns.get("type") != "user"]
    linux.pop("uidMappings", None)
    linux.pop("gidMappings", None)
    return maps


def take_pids_limit(resources):
    """`--pids-limit` counts the workload's processes in the guest: in the container
    it would count QEMU's threads."""
    limit = (resources.pop("pids", None) or {}).get("limit") or 0
    return max(0, limit)


def choose_boot(kernel, kernels, bundle):
    """DKVM_KERNEL's boot descriptor: a kernel the payload carries, or the image's own,
    found in the image's tree now (the container side opens it at start)."""
    name, _, release = kernel.partition("/")
    if name != IMAGE_KERNEL:
        return kernels[name]
    path, release = bundle.image_kernel(release)
    return Boot(name=IMAGE_KERNEL, release=release, kernel=path, source=f"the image's {path}")


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


def tcg_cache_mib(limit_mib):
    return min(max(limit_mib // TCG_CACHE_SHARE, TCG_CACHE_MIN_MIB), TCG_CACHE_MAX_MIB)


def plan_memory(resources, accel):
    """(guest RAM, TCG translation cache (0 under KVM), execs at once): MiB, MiB and a
    count. The container's memory limit holds the whole VM, as `docker stats` shows
    it: guest RAM is what is left of it once QEMU, its translation cache, virtiofsd and
    the exec relays have theirs, so a guest that fills its RAM meets its own OOM
    killer, never the host's. Without a limit the guest gets the default."""
    limit = ((resources.get("memory") or {}).get("limit") or 0) // MIB
    if limit <= 0:
        return DEFAULT_GUEST_MIB, TCG_CACHE_MAX_MIB if accel == "tcg" else 0, MOST_EXECS
    guest, cache, execs = split_limit(limit, accel)
    if guest < MIN_GUEST_MIB:
        least = MIN_GUEST_MIB + container_side_mib(MIN_EXECS)
        while split_limit(least, accel)[0] < MIN_GUEST_MIB:    # the cache grows with it
            least += 1
        raise DkvmError(f"memory limit {limit}MiB (--memory) is too small to boot a VM: "
                        f"use at least {least}m (QEMU, virtiofsd and {execs} execs "
                        f"take {limit - guest}MiB of it, the guest needs {MIN_GUEST_MIB}MiB)")
    return guest, cache, execs


def split_limit(limit, accel):
    """(guest RAM, translation cache, execs) out of a limit in MiB."""
    cache = tcg_cache_mib(limit) if accel == "tcg" else 0
    execs = exec_slots(limit)
    return limit - container_side_mib(execs) - cache, cache, execs


def exec_slots(limit_mib):
    """How many `docker exec`s a container with this memory limit (MiB) runs at once."""
    return min(max(limit_mib // EXEC_SHARE_MIB, MIN_EXECS), MOST_EXECS)


def container_side_mib(execs):
    """The container side's share of the limit: QEMU, virtiofsd, the entrypoint, and
    room for `execs` exec relays."""
    return VM_SIDE_MIB + execs * EXEC_RELAY_MIB


def container_side_nofile(nr_open_path="/proc/sys/fs/nr_open", status_path="/proc/self/status"):
    """The container side's rlimits: RLIMIT_NOFILE as high as the host lets a process
    have (fs.nr_open), for virtiofsd, which holds a descriptor for each inode the
    guest knows (the engine's 20000 left a guest unable to make its 20000th file); the
    workload keeps the engine's (engine_nofile). runc raises it as root, which needs
    CAP_SYS_RESOURCE: a host whose root lacks it keeps the engine's ([])."""
    if not has_sys_resource(status_path):
        return []
    try:
        with open(nr_open_path) as f:
            most = int(f.read())
    except (OSError, ValueError):
        most = NR_OPEN_DEFAULT
    engine_hard = engine_nofile()[1]
    if engine_hard != RLIM_INFINITY:
        most = max(most, engine_hard)
    return [{"type": "RLIMIT_NOFILE", "soft": most, "hard": most}]


def has_sys_resource(status_path):
    try:
        with open(status_path) as f:
            effective = next(line for line in f if line.startswith("CapEff:"))
        return bool(int(effective.split()[1], 16) >> CAPABILITY_NUMBERS["CAP_SYS_RESOURCE"] & 1)
    except (OSError, ValueError, StopIteration, IndexError):
        return False


def engine_nofile():
    """[soft, hard] RLIMIT_NOFILE as runc's container would have it where config.json
    sets none: the runtime's own (the engine started both)."""
    import resource
    return [RLIM_INFINITY if value == resource.RLIM_INFINITY else value
            for value in resource.getrlimit(resource.RLIMIT_NOFILE)]


def vm_footprint_mib(plan):
    """The most memory the VM can take: the least memory limit that holds it."""
    return plan.memory_mib + plan.tcg_cache_mib + container_side_mib(plan.max_execs)


# each disk's virtio-blk serial, by its place in DKVM_DISKS: how QEMU's device and the
# guest's /sys/block/<dev>/serial name the same disk
DISK_SERIAL = "dkvm-disk{}"


def plan_disks(disks, mounts, readonly_root):
    """DKVM_DISKS' disks (schema.Disk, as the option reads them) as the plan's: each
    given its serial. A backing file must be where the container side can write it:
    not under a read-only root or bind, nor a `--tmpfs` (the guest's)."""
    for index, disk in enumerate(disks):
        file = disk.file
        under = [m for m in mounts if m.get("destination") and
                 (file + "/").startswith(m["destination"].rstrip("/") + "/")]
        mount = max(under, key=lambda m: len(m["destination"]), default=None)
        if mount is None and readonly_root or \
                mount is not None and "ro" in (mount.get("options") or []):
            raise DkvmError(f"DKVM_DISKS: the file {file} is on a read-only path "
                            "(put it on a writable volume)")
        if mount is not None and mount.get("type") == "tmpfs":
            raise DkvmError(f"DKVM_DISKS: the file {file} is on a --tmpfs, which lives in "
                            "the guest (put it on a volume or in the container's root)")
        disk.serial = DISK_SERIAL.format(index)
    return disks


def split_user_tmpfs(mounts):
    """`--tmpfs` mounts belong in the guest, not in the container."""
    keep, moved = [], []
    for mount in mounts:
        if mount.get("type") == "tmpfs" and mount.get("destination") not in SYSTEM_TMPFS:
            moved.append(Tmpfs(destination=mount["destination"],
                               options=list(mount.get("options") or [])))
        else:
            keep.append(mount)
    return keep, moved


def lay_out_mounts(mounts, image_root, readonly, payload_dir, resolve):
    """The container's mounts, in order: the image's root in the export, the mounts
    meant for the workload inside it (each at its real place in the image:
    `resolve(destination, earlier binds)`), then the engine's mounts the container side
    keeps, then DKVM's own, last, so that they cover anything mounted before them."""
    workload, container_side = [], []
    binds = []                          # (destination in the image, host source)
    for mount in mounts:
        destination = mount.get("destination", "")
        if destination in CONTAINER_SIDE_MOUNTS:
            container_side.append(mount)
            continue
        real = resolve(destination, list(binds))
        workload.append({**mount, "destination": paths.SHARED_ROOTFS + real,
                         "options": inert(mount.get("options"))})
        if mount.get("type") == "bind":
            binds.append((real, mount.get("source", "")))
    image = {"destination": paths.SHARED_ROOTFS, "type": "bind", "source": image_root,
             "options": inert(["rbind", "rprivate", "ro" if readonly else "rw"])}
    return [image] + workload + container_side + own_mounts(payload_dir)


def inert(options):
    """A mount in the export: on the host its device nodes open nothing and its
    set-id bits raise nobody (the guest reads both through its own kernel), so a
    compromised guest kernel asking virtiofsd to open a node reaches no host device."""
    options = list(options or [])
    return options + [flag for flag in ("nosuid", "nodev") if flag not in options]


def own_mounts(payload_dir):
    """The payload for the container side and, in the export, for the guest; private
    tmpfs for sockets and logs (/run), /tmp, and an empty read-only /etc (the loader
    and libc find no ld.so.preload, nsswitch.conf or anything else there)."""
    payload = {"type": "bind", "source": payload_dir, "options": ["rbind", "ro", "nosuid",
                                                                 "nodev"]}
    tmpfs = {"type": "tmpfs", "source": "tmpfs"}
    return [
        {**payload, "destination": paths.PAYLOAD_MOUNT},
        {**payload, "destination": paths.SHARED_PAYLOAD},
        {**tmpfs, "destination": "/run", "options": ["nosuid", "nodev", "mode=700", "size=16m"]},
        {**tmpfs, "destination": "/tmp", "options": ["nosuid", "nodev", "mode=1777",
                                                     "size=16m"]},
        {**tmpfs, "destination": "/etc", "options": ["ro", "nosuid", "nodev", "noexec",
                                                     "mode=755", "size=64k"]},
    ]


def confine_container_side(config):
    """The container side's view of the host is its own, whatever the engine granted
    the workload (`--privileged`, `--security-opt systempaths=unconfined`, device
    rules): sysfs and cgroupfs read-only, Docker's masks on /proc and /sys, only its
    own devices."""
    linux = config["linux"]
    for key, defaults in (("maskedPaths", CONTAINER_SIDE_MASKED_PATHS),
                          ("readonlyPaths", CONTAINER_SIDE_READONLY_PATHS)):
        linux[key] = list(defaults) + [path for path in linux.get(key) or []
                                       if path not in defaults and not guest_paths([path])]
    config["mounts"] = [read_only(mount) if mount.get("destination") in READ_ONLY_MOUNTS
                        else mount for mount in config.get("mounts") or []]
    linux.setdefault("resources", {})["devices"] = copy.deepcopy(CONTAINER_SIDE_DEVICE_RULES)


def read_only(mount):
    options = [option for option in mount.get("options") or [] if option != "rw"]
    return {**mount, "options": options if "ro" in options else options + ["ro"]}


def container_side_seccomp():
    """The profile for a container side the engine left without one."""
    rules = [{"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}]
    rules += [{"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
               "args": [{"index": 0, "value": flag, "valueTwo": flag,
                         "op": "SCMP_CMP_MASKED_EQ"}]}
              for name, flags in NAMESPACE_FLAGS.items() for flag in flags]
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": list(SECCOMP_ARCHITECTURES),
            "syscalls": rules + [dict(CLONE3_FALLBACK)]}


def set_capabilities(process, caps):
    """Exactly `caps`, whatever the engine gave the workload: the container side's
    needs do not change with `--cap-drop` or the engine's defaults."""
    process["capabilities"] = {"bounding": list(caps), "effective": list(caps),
                               "permitted": list(caps), "inheritable": [], "ambient": []}


def allow_container_side_syscalls(linux):
    """The engine's seccomp profile allows some calls only with the capability that
    goes with them, as the workload's set had it (Docker's, after `--cap-drop ALL`,
    has no chroot); the container side's set is its own. virtiofsd's sandbox calls
    chroot, and unshare(CLONE_FS), which Docker allows only with CAP_SYS_ADMIN; the
    entrypoint pages QEMU's copy of the kernel out with process_madvise, which
    Docker's profile does not name: allow exactly those. A profile that does not
    name clone3 refuses it with its default action (EPERM, often), and glibc then
    cannot start a thread: QEMU and virtiofsd die. ENOSYS, as Docker's own profile
    answers, has glibc fall back to clone."""
    seccomp = linux.get("seccomp")
    if not seccomp:
        return
    rules = seccomp.setdefault("syscalls", [])
    mentioned = {name for rule in rules for name in rule.get("names") or []}
    rules.extend([
        {"names": ["chroot", "pidfd_open", "process_madvise"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["unshare"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": CLONE_FS, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
    ])
    if "clone3" not in mentioned and seccomp.get("defaultAction") != "SCMP_ACT_ALLOW":
        rules.append(CLONE3_FALLBACK)


def add_device(linux, dev):
    """The device node, and the cgroup rule that allows it: each once."""
    devices = linux.setdefault("devices", [])
    if not any(d.get("path") == dev["path"] for d in devices):
        devices.append({"path": dev["path"], "type": "c", "major": dev["major"],
                        "minor": dev["minor"], "fileMode": 0o666, "uid": 0, "gid": 0})
    rules = linux.setdefault("resources", {}).setdefault("devices", [])
    rule = {"allow": True, "type": "c", "major": dev["major"], "minor": dev["minor"],
            "access": "rwm"}
    if rule not in rules:
        rules.append(rule)
