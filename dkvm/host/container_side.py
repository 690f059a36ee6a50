"""What the container side gets, whatever the engine gave the workload: its own
capabilities, seccomp profile, device cgroup, masked and read-only paths, /sys and
cgroupfs read-only, its descriptor limit, and its own mounts (the payload, private
tmpfs). `--privileged`, `seccomp=unconfined` and the workload's capabilities are the
workload's, in its VM: the container side stays as it is without them. Pure."""
import copy

from dkvm import paths
from dkvm.kernel_names import CAPABILITY_NUMBERS, RLIM_INFINITY

NR_OPEN_DEFAULT = 1 << 20   # the kernel's fs.nr_open unless the host changed it
# The container side's capabilities, whatever the workload was given: virtiofsd's
# (it serves files as their owners: CHOWN to SETFCAP; SYS_CHROOT, SETPCAP for its
# sandbox), NET_ADMIN for the taps, SYS_NICE to page QEMU's copy of the kernel out
# once the guest runs (processes.release_kernel_image). The workload's own go to
# the guest.
CONTAINER_SIDE_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID",
                       "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_SETFCAP",
                       "CAP_MKNOD", "CAP_SYS_CHROOT", "CAP_NET_ADMIN", "CAP_SYS_NICE"]
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
                                       if path not in defaults and in_kernel_trees(path)]
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


def in_kernel_trees(path):
    """Under /proc or /sys: the kernel's own trees (the host's for the container side,
    the guest's own for the workload)."""
    return any(path == top or path.startswith(top + "/") for top in ("/proc", "/sys"))
