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
uses. What the container side gets whatever the engine gave the workload is
host.container_side's; the VM's size out of the container's limits, host.vm_size's.
"""
import copy
import os

from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.host.container_side import (CONTAINER_SIDE_CAPS, KVM, TUN, add_device,
                                      allow_container_side_syscalls, confine_container_side,
                                      container_side_nofile, container_side_seccomp,
                                      engine_nofile, in_kernel_trees, own_mounts,
                                      set_capabilities)
from dkvm.host.devices import guest_devices
from dkvm.host.settings import parse_settings, split_env
from dkvm.host.vm_size import plan_memory, vcpus_for
from dkvm.kernel_names import CAPABILITY_NUMBERS
from dkvm.options import IMAGE_KERNEL
from dkvm.schema import (CAPABILITY_SETS, MOST_POD_VOLUMES, POD_MEMBER, ROOT_PROPAGATIONS, Boot,
                         Capabilities, ExecRequest, IdMapping, Options, Plan, PodVolume,
                         Process, Rlimit, Tmpfs)

# What the VM keeps from the workload's full root unless the config grants it:
# reboot() from the workload ends the container (the guest kernel kills its PID
# namespace); under runc it fails for want of SYS_BOOT, and systemd exits 0 instead.
WITHHELD_CAPS = {"CAP_SYS_BOOT"}
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
    process = config["process"] = config.get("process") or {}
    linux = config.setdefault("linux", {})
    workload_env, settings = split_env(process.get("env") or [])
    values = parse_settings(settings, host, host.defaults, host.policy_allows)
    options = Options(**{name: values[name] for name in Options.FIELDS})
    options.accel = choose_accel(options.accel, host.kvm_usable)
    netns_path = host.engine.check_network_namespace(linux)
    resources = linux.setdefault("resources", {})
    plan = workload_plan(config, workload_env, host.engine, container_id)
    plan.options = options
    plan.cpus = vcpus_for(resources.get("cpu") or {})
    plan.boot = choose_boot(options.kernel, host.kernels, bundle)
    plan.network_namespace_kept = bool(netns_path)
    plan.dns_upstream = list(host.dns_upstream)
    plan.memory_mib, plan.tcg_cache_mib, plan.max_execs = plan_memory(resources,
                                                                       options.accel)
    plan.disks = plan_disks(values["disks"], config.get("mounts") or [], plan.readonly_root)
    become_container_side(config, plan, bundle, host.payload_dir, "dkvm-ctr-entrypoint")
    set_capabilities(process, CONTAINER_SIDE_CAPS + (["CAP_SYS_ADMIN"] if options.sys_admin
                                                     else []))
    add_device(linux, TUN)
    if options.accel == "kvm":
        add_device(linux, KVM)
    return config, plan


def rewrite_member_config(config, host, bundle, container_id=""):
    """A Kubernetes pod's member (host.pods): its process runs in the pod's VM, which
    its sandbox's container side runs, so its own container side only exports its root
    (virtiofsd) and relays (dkvm-pod-member): no VM, no TUN, no KVM, no template. Its
    DKVM_* settings size and shape a VM, the sandbox's to have: they are left out of
    its environment, and not read. It joins the sandbox's network namespace
    (/proc/PID/ns/net), where it touches no interface. Returns (config, plan) as
    rewrite_create_config does."""
    config = copy.deepcopy(config)
    process = config["process"] = config.get("process") or {}
    linux = config.setdefault("linux", {})
    workload_env, _ = split_env(process.get("env") or [])
    host.engine.check_network_namespace(linux, joins_pod=True)
    linux.setdefault("resources", {})
    plan = workload_plan(config, workload_env, host.engine, container_id)
    if plan.uid_mappings:
        raise DkvmError("a user namespace for a pod's container (hostUsers: false) is not "
                        "supported by DKVM yet")
    plan.pod = POD_MEMBER
    # CRI gives a member the sandbox's PID namespace when the pod shares one: its
    # relay joins it, as runc's process would; in the VM, the member joins the pause's
    plan.pod_shares_pid = any(ns.get("type") == "pid" and ns.get("path")
                              for ns in linux.get("namespaces") or [])
    become_container_side(config, plan, bundle, host.payload_dir, "dkvm-pod-member")
    config["mounts"], plan.pod_volumes = with_pod_volumes(config["mounts"])
    set_capabilities(process, [])       # it only connects: the sandbox's side serves its root
    return config, plan


def workload_plan(config, env, engine, container_id):
    """The plan's fields for the workload's process and the world it sees in the guest,
    a VM's or a pod member's; what is the guest's takes it out of the config (a user
    namespace, the pids limit)."""
    process, linux = config["process"], config["linux"]
    uid_mappings, gid_mappings = take_user_namespace(linux)
    return Plan(
        container_id=container_id,
        process=process_spec(process, env, engine.default_capabilities),
        hostname=config.get("hostname", ""),
        domainname=config.get("domainname", ""),
        sysctl=dict(linux.get("sysctl") or {}),
        readonly_root=bool((config.get("root") or {}).get("readonly")),
        masked_paths=guest_paths(linux.get("maskedPaths")),
        readonly_paths=guest_paths(linux.get("readonlyPaths")),
        root_propagation=root_propagation(linux.get("rootfsPropagation")),
        uid_mappings=uid_mappings,
        gid_mappings=gid_mappings,
        devices=guest_devices(linux),
        pids_limit=take_pids_limit(linux.setdefault("resources", {})),
    )


def become_container_side(config, plan, bundle, payload_dir, role):
    """The container becomes DKVM's container side running `role`: its root the
    skeleton, the image's and the workload's mounts in the export, DKVM's after them,
    `--tmpfs` moved to the plan, root with no new privileges, confined whatever the
    engine granted the workload (host.container_side). Its capabilities and devices
    are the caller's to give."""
    process, linux = config["process"], config["linux"]
    mounts, plan.tmpfs = split_user_tmpfs(config.get("mounts") or [])
    config["mounts"] = lay_out_mounts(mounts, bundle.image_root, plan.readonly_root,
                                      payload_dir, bundle.resolve)
    config["root"] = {"path": bundle.skeleton, "readonly": True}
    process["args"] = paths.role_argv(role)
    process["cwd"] = "/"
    process["env"] = [f"PATH={CONTAINER_PATH}"]     # the plan is a file: handoff
    process["user"] = {"uid": 0, "gid": 0}
    process["noNewPrivileges"] = True
    process["rlimits"] = container_side_nofile()
    plan.engine_nofile = engine_nofile()
    linux["devices"] = []               # the workload's are made in the guest
    confine_container_side(config)
    allow_container_side_syscalls(linux)
    if not linux.get("seccomp"):
        linux["seccomp"] = container_side_seccomp()


def rewrite_exec_process(process, container_id, engine_capabilities, request_fd,
                         member=False):
    """Return the process.json for `runc exec` that relays `process` into the guest,
    and the relay's request, which it reads from descriptor `request_fd` (handoff).
    The relay runs as root in the container with no capability (it only talks to the
    container side's control multiplexer, in root's /run, or for a pod's `member` to
    the pod's sandbox); the user, env, cwd, terminal and limits go to the guest."""
    process = copy.deepcopy(process)
    env, _ = split_env(process.get("env") or [])
    request = ExecRequest(container_id=container_id,
                          process=process_spec(process, env, engine_capabilities),
                          member=member)
    process["args"] = paths.role_argv("dkvm-exec-relay") + [paths.EXEC_REQUEST_FD,
                                                            str(request_fd)]
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
    return [path for path in paths_in_config or [] if not in_kernel_trees(path)]


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


def with_pod_volumes(mounts, is_dir=os.path.isdir):
    """A member's directory binds in its export (its volumes: emptyDir, configMap,
    projected token) each bound again at POD_VOLUMES_DIR/<n> in its container side,
    where its relay hands it to the sandbox, which exports a volume once for the
    whole pod: members sharing one see one filesystem, one cache. (mounts, the plan's
    PodVolumes); at most MOST_POD_VOLUMES, the rest stay in the member's export."""
    again, volumes = [], []
    for mount in mounts:
        destination = mount.get("destination", "")
        if len(volumes) == MOST_POD_VOLUMES or mount.get("type") != "bind" or \
                not destination.startswith(paths.SHARED_ROOTFS + "/") or \
                not is_dir(mount.get("source", "")):
            continue
        again.append({**mount, "destination": f"{paths.POD_VOLUMES_DIR}/{len(volumes)}"})
        volumes.append(PodVolume(destination=destination[len(paths.SHARED_ROOTFS):]))
    return mounts + again, volumes


def inert(options):
    """A mount in the export: on the host its device nodes open nothing and its
    set-id bits raise nobody (the guest reads both through its own kernel), so a
    compromised guest kernel asking virtiofsd to open a node reaches no host device."""
    options = list(options or [])
    return options + [flag for flag in ("nosuid", "nodev") if flag not in options]
