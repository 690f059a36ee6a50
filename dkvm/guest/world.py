"""The container's world, rebuilt in the VM before the workload starts.

init keeps a root of its own (a tmpfs the initramfs made, with the container's export
at paths.SHARE_DIR and the payload at paths.PAYLOAD_MOUNT); the workload's root is the
image's, paths.SHARED_ROOTFS, in a mount namespace of its own where it finds what runc
would have mounted (sysfs, /dev, cgroups, /dev/shm, `--tmpfs`), over whatever the
image has there (workload.spawn), in a cgroup of its own, with DKVM_DISKS mounted.
Host and domain names, sysctls and the network are the VM's own; the kernel's modules
are in init's root (for the kernel's own requests) and in the workload's."""
import os
import stat
import time

from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.guest import network, syscalls

PORT_WAIT = 10
EXPORT_WAIT = 10                  # a restored VM: its hot-plugged export showing up
TEMPLATE_ROOT = "/.root"          # in a template's initramfs: init's root, a bind of it
CONSOLE = "/dev/hvc0"             # the guest console: the workload's terminal with -t
CGROUP_ROOT = "/sys/fs/cgroup"
WORKLOAD_CGROUP = CGROUP_ROOT + "/workload"     # the root of the workload's cgroup namespace
DEVICE_TYPES = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


def enter_own_root():
    """What the initramfs's /init does for the other kernels (guest-init/init), for a
    kernel that mounted the export as / and started init from the payload in it: init
    gets a root of its own, a tmpfs (in the payload's empty guest-init/root) with the
    export at /share and the payload at /.dkvm; and at /dkvm too, where this Python
    imports from. Nothing of the image's is run or opened. stdin is /dev/null, stdout
    and stderr the kernel's log, as the initramfs's /init leaves them."""
    syscalls.mount("none", paths.DIRECT_ROOT, "tmpfs", data="mode=755")
    os.chdir(paths.DIRECT_ROOT)
    for directory in (paths.SHARE_DIR, paths.PAYLOAD_MOUNT, paths.DIRECT_PAYLOAD, "/dev",
                      "/proc", "/sys", "/lib/modules"):
        os.makedirs(directory[1:])
    syscalls.mount("devtmpfs", "dev", "devtmpfs")
    redirect_stdio("dev/null", "dev/kmsg")
    syscalls.pivot_root(".", paths.SHARE_DIR[1:])
    os.chdir("/")
    for target in (paths.PAYLOAD_MOUNT, paths.DIRECT_PAYLOAD):
        syscalls.bind_mount(paths.SHARED_PAYLOAD, target, readonly=True)
    syscalls.unmount("/dev", syscalls.MNT_DETACH)


def enter_template_root():
    """A template's init runs from the initramfs (rootfs), which pivot_root cannot
    leave, and the workload's namespace pivots into the image's root. So init's root
    becomes a bind mount of the initramfs moved over it, which has a parent mount, as
    switch_root would give a tmpfs, without a copy of the files."""
    os.makedirs(TEMPLATE_ROOT, exist_ok=True)
    syscalls.bind_mount("/", TEMPLATE_ROOT)
    os.chdir(TEMPLATE_ROOT)
    syscalls.mount(".", "/", "", syscalls.MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def resume_from_template(plan):
    """A VM restored from a template (host.templates) shares the template's clock and
    random state with every other one: it takes the host's time and fresh entropy from
    its plan (QEMU's vmgenid has the kernel reseed too, where it has the driver). Then
    the container's export, hot-plugged as the VM resumed, becomes /share, and its
    payload (the same build's) /.dkvm, as the initramfs does for a cold boot; and the
    container's NICs, hot-plugged too, are waited for."""
    syscalls.set_wall_clock(plan.wall_clock_ns)
    syscalls.add_entropy(bytes.fromhex(plan.entropy))
    mount_export(paths.VIRTIOFS_TAG, paths.SHARE_DIR)
    syscalls.bind_mount(paths.SHARED_PAYLOAD, paths.PAYLOAD_MOUNT, readonly=True)
    import sys
    sys.path_importer_cache.clear()     # what the initramfs lacked, the payload has
    network.wait_for_links([iface.mac for iface in plan.interfaces])


def mount_export(tag, target):
    """A hot-plugged export (virtiofs `tag`) at `target`, once its device is probed
    (bounded)."""
    deadline = time.monotonic() + EXPORT_WAIT
    while True:
        try:
            syscalls.mount(tag, target, "virtiofs")
            return
        except OSError as err:          # its device not probed yet: no such tag
            if time.monotonic() > deadline:
                raise DkvmError(f"the container's export did not appear: {err}") from None
            time.sleep(0.005)


def redirect_stdio(stdin_path, output_path):
    """fds 0, 1 and 2 (the kernel starts init with none), and sys's streams on them."""
    import sys
    for fd, path, flags in ((0, stdin_path, os.O_RDONLY), (1, output_path, os.O_WRONLY),
                            (2, output_path, os.O_WRONLY)):
        opened = os.open(path, flags)
        if opened != fd:
            os.dup2(opened, fd)
            os.close(opened)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def mount_init_filesystems():
    """init's own proc, sysfs and /dev: for its ports, the network and sysctls."""
    for source, target, fstype in (("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"),
                                   ("devtmpfs", "/dev", "devtmpfs")):
        os.makedirs(target, exist_ok=True)
        syscalls.mount(source, target, fstype, syscalls.MS_NOSUID)


def make_workload_cgroup(plan):
    """The workload's cgroup, which its cgroup namespace shows as the root (a clean
    tree: no init, no `0` entries), with every controller the kernel has for it to
    delegate, and `--pids-limit` counted there (each exec joins it)."""
    syscalls.mount("cgroup2", CGROUP_ROOT, "cgroup2",
                   syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
    with open(CGROUP_ROOT + "/cgroup.controllers") as f:
        controllers = f.read().split()
    for controller in controllers:
        try:
            with open(CGROUP_ROOT + "/cgroup.subtree_control", "w") as f:
                f.write("+" + controller)
        except OSError:
            pass                # one the kernel will not delegate: the rest still are
    os.mkdir(WORKLOAD_CGROUP)
    if plan.pids_limit:
        with open(WORKLOAD_CGROUP + "/pids.max", "w") as f:
            f.write(str(plan.pids_limit))


def join_workload_cgroup(workload_pid=None):
    """This process into the workload's cgroup (from init's mount namespace, whose
    cgroup namespace is the whole tree). An exec joins the cgroup the workload's PID 1
    is in now, as runc's does: the workload's own may have given its processes to
    subgroups (systemd does), and then takes none itself."""
    path = WORKLOAD_CGROUP
    if workload_pid is not None:
        with open(f"/proc/{workload_pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::/"):
                    path = CGROUP_ROOT + line[3:].rstrip("\n")
    join_cgroup(path)


def join_cgroup(path):
    with open(path + "/cgroup.procs", "w") as f:
        f.write("0")


def make_devices(devices):
    """`--device` nodes, as runc makes them (a node of that name already there, as in
    the guest's own /dev, is replaced)."""
    for dev in devices:
        os.makedirs(os.path.dirname(dev.path), exist_ok=True)
        if os.path.lexists(dev.path):
            os.unlink(dev.path)
        os.mknod(dev.path, DEVICE_TYPES[dev.type] | dev.file_mode,
                 os.makedev(dev.major, dev.minor))
        os.chown(dev.path, dev.uid, dev.gid)
        os.chmod(dev.path, dev.file_mode)


def mount_container_filesystems(plan, console=False, devpts=None):
    """In the workload's new root (paths resolve inside the image, its symlinks
    included): the kernel filesystems a container gets from runc, /dev/shm of the size
    asked for, the `--tmpfs` mounts; /proc comes after, with the PID namespace.
    `console`: the VM's console is the container's terminal; `devpts`: a devpts made
    for it already (a detached mount: syscalls.clone_mount), where its terminal is."""
    mounts = [
        ("sysfs", "/sys", "sysfs", ["nosuid", "nodev", "noexec"]),
        ("devtmpfs", "/dev", "devtmpfs", ["nosuid", "mode=755"]),
        ("devpts", "/dev/pts", "devpts", ["nosuid", "noexec", "gid=5", "mode=620",
                                          "ptmxmode=666"]),
        ("mqueue", "/dev/mqueue", "mqueue", ["nosuid", "nodev", "noexec"]),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", ["nosuid", "nodev", "noexec"]),
        ("shm", "/dev/shm", "tmpfs", ["nosuid", "nodev", "noexec", "mode=1777",
                                      f"size={plan.options.dev_shm_size}"]),
    ] + [("tmpfs", mount.destination, "tmpfs", mount.options) for mount in plan.tmpfs]
    os.makedirs("/proc", exist_ok=True)
    for source, target, fstype, options in mounts:
        os.makedirs(target, exist_ok=True)
        if fstype == "devpts" and devpts is not None:
            syscalls.move_mount(devpts, target)
            continue
        syscalls.mount(source, target, fstype, *syscalls.mount_options(options))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        if not os.path.lexists(f"/dev/{name}"):
            os.symlink(target, f"/dev/{name}")
    make_devices(plan.devices)
    if console:                     # as runc binds its terminal there: systemd's status
        syscalls.bind_mount(CONSOLE, "/dev/console")


def mask_and_protect_paths(plan):
    """linux.maskedPaths and readonlyPaths, as runc applies them: a directory masked
    by an empty read-only tmpfs, anything else by /dev/null; a read-only path bound
    onto itself read-only. A path the image does not have is skipped."""
    for path in plan.masked_paths:
        if os.path.isdir(path):
            syscalls.mount("tmpfs", path, "tmpfs", syscalls.MS_RDONLY)
        elif os.path.lexists(path):
            syscalls.bind_mount("/dev/null", path)
    for path in plan.readonly_paths:
        if os.path.lexists(path):
            syscalls.mount(path, path, "", syscalls.MS_BIND | syscalls.MS_REC)
            syscalls.mount("", path, "", syscalls.MS_REMOUNT | syscalls.MS_BIND
                           | syscalls.MS_RDONLY | syscalls.MS_REC)


def apply_identity(plan):
    """Names, sysctls and the network, up to NICs the kernel has yet to mark running
    (its link watcher can take a few tenths of a second): those steps are returned,
    for `finish_network` once init has done what does not need them."""
    syscalls.set_uts_names(plan.hostname, plan.domainname)
    syscalls.write_sysctls(plan.sysctl)
    syscalls.interface_up("lo")
    return network.run_steps(plan.network_setup, until_waiting=True)


def finish_network(steps_left):
    """The workload starts, as under runc, with every NIC running."""
    network.run_steps(steps_left)


def mount_kernel_modules(modules, target):
    """The boot descriptor's modules for this kernel, with depmod's indexes, read-only
    at `target`."""
    if not modules:
        raise DkvmError("this guest kernel carries no modules to mount")
    os.makedirs(target, exist_ok=True)
    syscalls.bind_mount(modules, target, readonly=True)


def serve_module_requests(plan):
    """The kernel's own module requests (a filesystem mounted, a netfilter extension,
    a device opened) run the payload's busybox modprobe in init's root, where the
    running kernel's modules are at /lib/modules. The nodes of devices whose module
    is loaded when they are opened (/dev/loop-control, /dev/net/tun) are made, as
    `kmod static-nodes` makes them on other systems."""
    if not plan.boot.modules:
        return
    mount_kernel_modules(plan.boot.modules, "/lib/modules")
    syscalls.write_sysctls({"kernel.modprobe": paths.payload_path("bin", "modprobe")})
    for line in static_nodes(f"/lib/modules/{plan.boot.release}"):
        fields = line.split()
        if len(fields) != 3 or line.startswith("#") or fields[2][:1] not in "cb":
            continue
        major, _, minor = fields[2][1:].partition(":")
        path = "/dev/" + fields[1]
        if not os.path.lexists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.mknod(path, DEVICE_TYPES[fields[2][0]] | 0o600,
                     os.makedev(int(major), int(minor)))


def static_nodes(modules):
    """The lines of depmod's modules.devname: a payload kernel's, under DKVM's name
    (paths.STATIC_NODES), or an image kernel's own."""
    for name in (paths.STATIC_NODES, "modules.devname"):
        try:
            with open(f"{modules}/{name}") as f:
                return f.read().splitlines()
        except OSError:
            continue
    return []


def mount_workload_modules(plan, root):
    """The running kernel's modules in the workload's root (before it is pivoted
    into), for its own modprobe: at /lib/modules/<release>, beside the image's own,
    in images that have a /lib (one that lacks it gets none: the kernel's own requests
    still work); over the whole of /lib/modules with DKVM_KERNEL_MOUNT_LIB_MODULES.
    The image's own kernel finds its modules where the image keeps them."""
    if not plan.boot.modules or plan.boot.from_image:
        return
    if plan.options.kernel_lib_modules:
        mount_kernel_modules(plan.boot.modules, root + "/lib/modules")
        return
    target = f"{root}/lib/modules/{plan.boot.release}"
    if not os.path.isdir(root + "/lib"):
        return
    try:
        os.makedirs(target, exist_ok=True)
    except OSError:                 # a read-only root
        return
    syscalls.bind_mount(f"{plan.boot.modules}/{plan.boot.release}", target, readonly=True)


def attach_disks(plan):
    """DKVM_DISKS: the virtio-blk driver and the filesystem's (this kernel has both as
    modules), then each disk's device node, found by its serial."""
    if not plan.disks:
        return {}
    for module in ("virtio_blk", "ext4"):
        run_payload_program("modprobe", module)
    return find_devices("/sys/block", "serial", [disk.serial for disk in plan.disks], "disks")


def mount_disks(plan, devices, root):
    """Each disk at its mount point in the workload's root (made if missing)."""
    for disk in plan.disks:
        target = root + disk.mount_point
        os.makedirs(target, exist_ok=True)
        syscalls.mount(devices[disk.serial], target, disk.filesystem)


def run_payload_program(name, *args):
    """A payload program from init, to its end (init forks: it may not make threads)."""
    program = paths.payload_path("bin", name)
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(program, [program, *args])
        finally:
            os._exit(127)
    _, wstatus = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(wstatus) != 0:
        raise DkvmError(f"{name} {' '.join(args)} failed")


def find_ports(wanted):
    """virtio-serial ports by name."""
    return find_devices("/sys/class/virtio-ports", "name", wanted, "virtio-serial ports")


def find_devices(base, attribute, wanted, what):
    """{sysfs `attribute` of each device under `base`: its /dev node}, once every
    `wanted` one is there with its node (no udev in the guest: read sysfs), bounded."""
    deadline = time.monotonic() + PORT_WAIT
    while True:
        found = {}
        for dev in os.listdir(base) if os.path.isdir(base) else []:
            try:
                with open(f"{base}/{dev}/{attribute}") as f:
                    found[f.read().strip()] = f"/dev/{dev}"
            except OSError:
                continue
        if all(name in found and os.path.exists(found[name]) for name in wanted):
            return found
        if time.monotonic() > deadline:
            raise DkvmError(f"{what} missing: {sorted(set(wanted) - set(found))}")
        time.sleep(0.02)


def open_stdio_ports(ports):
    return (os.open(ports[paths.PORT_STDIN], os.O_RDONLY | os.O_CLOEXEC),
            os.open(ports[paths.PORT_STDOUT], os.O_WRONLY | os.O_CLOEXEC),
            os.open(ports[paths.PORT_STDERR], os.O_WRONLY | os.O_CLOEXEC))
