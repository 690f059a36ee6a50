"""The container's world, rebuilt in the VM before the workload starts: the kernel
filesystems runc would mount, /dev/shm, host and domain names, sysctls, the network,
the kernel's modules when asked for, `--tmpfs` mounts; and the virtio-serial ports
that carry the control channel and the workload's stdio."""
import os
import time

from dkvm import paths
from dkvm.guest import network, syscalls

PORT_WAIT = 10


def setup_filesystems():
    """The kernel filesystems a container gets from runc, mounted over the container's
    own (which virtiofs shows but belong to the container side)."""
    mounts = [
        ("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"]),
        ("sysfs", "/sys", "sysfs", ["nosuid", "nodev", "noexec"]),
        ("devtmpfs", "/dev", "devtmpfs", ["nosuid", "mode=755"]),
        ("devpts", "/dev/pts", "devpts", ["nosuid", "noexec", "gid=5", "mode=620",
                                          "ptmxmode=666"]),
        ("mqueue", "/dev/mqueue", "mqueue", ["nosuid", "nodev", "noexec"]),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", ["nosuid", "nodev", "noexec"]),
    ]
    for source, target, fstype, options in mounts:
        os.makedirs(target, exist_ok=True)
        syscalls.mount(source, target, fstype, *syscalls.mount_options(options))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        if not os.path.lexists(f"/dev/{name}"):
            os.symlink(target, f"/dev/{name}")


def apply_identity(plan):
    os.makedirs("/dev/shm", exist_ok=True)
    syscalls.mount("shm", "/dev/shm", "tmpfs", *syscalls.mount_options(
        ["nosuid", "nodev", "noexec", "mode=1777", f"size={plan.options.dev_shm_size}"]))
    syscalls.set_uts_names(plan.hostname, plan.domainname)
    syscalls.write_sysctls(plan.sysctl)
    syscalls.interface_up("lo")
    network.run_steps(plan.network_setup)
    if plan.options.kernel_lib_modules:
        mount_kernel_modules(plan.boot.modules)
    for mount in plan.tmpfs:
        flags, data = syscalls.mount_options(mount.options)
        os.makedirs(mount.destination, exist_ok=True)
        syscalls.mount("tmpfs", mount.destination, "tmpfs", flags, data)


def mount_kernel_modules(modules):
    """DKVM_KERNEL_MOUNT_LIB_MODULES: the boot descriptor's modules for this kernel,
    with depmod's indexes, read-only at /lib/modules, so that `modprobe` and the
    kernel's own module requests (crypto, netfilter extensions) find them. The image's
    /lib/modules, built for other kernels, is hidden. The kernel asks /sbin/modprobe,
    or the payload's busybox where the image has none."""
    if not modules:
        raise RuntimeError("this guest kernel carries no modules to mount")
    os.makedirs("/lib/modules", exist_ok=True)
    syscalls.bind_mount(modules, "/lib/modules", readonly=True)
    if not os.path.exists("/sbin/modprobe"):
        syscalls.write_sysctls({"kernel.modprobe": paths.payload_path("bin", "modprobe")})


def find_ports(wanted):
    """virtio-serial ports by name (no udev in the guest: read sysfs)."""
    deadline = time.monotonic() + PORT_WAIT
    while True:
        found = {}
        base = "/sys/class/virtio-ports"
        for dev in os.listdir(base) if os.path.isdir(base) else []:
            try:
                with open(f"{base}/{dev}/name") as f:
                    found[f.read().strip()] = f"/dev/{dev}"
            except OSError:
                continue
        if all(name in found and os.path.exists(found[name]) for name in wanted):
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial ports missing: {sorted(set(wanted) - set(found))}")
        time.sleep(0.02)


def open_stdio_ports(ports):
    return (os.open(ports[paths.PORT_STDIN], os.O_RDONLY | os.O_CLOEXEC),
            os.open(ports[paths.PORT_STDOUT], os.O_WRONLY | os.O_CLOEXEC),
            os.open(ports[paths.PORT_STDERR], os.O_WRONLY | os.O_CLOEXEC))
