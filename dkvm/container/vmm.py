"""Command lines for QEMU and virtiofsd, built from the plan (pure functions): QEMU
booting cold, or restoring from a template (its machine: boot.machine)."""
from dkvm import kernel_args, paths
from dkvm.boot.machine import (EVERY_VM_DEVICES, boot_options, machine_argv,
                               template_boot_argv, template_devices)
from dkvm.container.net.taps import tap_name

# virtiofsd's descriptor limit below which it serves directories without readdirplus
# (virtiofsd_argv); the kernel's default fs.nr_open (1M) is well above it
READDIRPLUS_LEAST = 1 << 18


def kernel_append(plan):
    """The kernel's command line (kernel_args.compose). A kernel without an initramfs
    mounts the export as its root, read-write (the workload's root is in it), and
    starts DKVM's init from the payload there: the payload's loader is init, and what
    follows `--` (last: the kernel passes it to init as is) its arguments."""
    options = plan.options
    init_argv = []
    boot_arguments = []
    if not plan.boot.initrd:
        init, *init_argv = paths.role_argv("dkvm-vm-init", root=paths.DIRECT_PAYLOAD)
        boot_arguments = [f"root={paths.VIRTIOFS_TAG}", "rootfstype=virtiofs", "rw",
                          f"init={init}"]
    parts = kernel_args.compose(boot_arguments + plan.boot.append, options.kernel_debug,
                                options.kernel_append)
    if init_argv:
        parts += ["--", *init_argv, paths.ENTER_OWN_ROOT]
    return " ".join(parts)


def qemu_argv(plan, vcpus, stdout_fd, stderr_fd, disk_fds=()):
    """QEMU for one container, booting cold. Without a terminal, the workload's stdout
    and stderr leave through two virtio-serial ports written straight to the
    container's fds, and stdin arrives on a third from a socket the entrypoint feeds
    and closes at EOF (QEMU opens a pipe chardev read-write, so it would never see EOF
    itself). With a terminal, the guest console is QEMU's stdio. The kernel's console
    goes to the container's stderr only when DKVM_KERNEL_DEBUG asks for it. Each
    DKVM_DISKS disk is an open file (`disk_fds`: read-write and read-only), a
    virtio-blk device the guest finds by its serial."""
    argv = machine_argv(plan.memory_mib, vcpus, plan.options.accel, plan.tcg_cache_mib,
                        "memory-backend-memfd")
    argv += [
        *boot_options(plan.boot),
        "-append", kernel_append(plan),
        "-chardev", f"socket,id=vfs,path={paths.VIRTIOFS_SOCKET}",
        "-device", command_line_options(export_device(), "driver"),
        "-device", "virtio-serial-pci,id=ser0,max_ports=8",
        "-chardev", f"socket,id=ctl,path={paths.CONTROL_SOCKET}",
        "-device", f"virtserialport,bus=ser0.0,nr=1,chardev=ctl,name={paths.PORT_CONTROL}",
        *EVERY_VM_DEVICES,
    ]
    argv += disk_backends(disk_fds)
    for number, disk in enumerate(plan.disks):
        argv += ["-device", command_line_options(disk_device(number, disk), "driver")]
    for number, iface in enumerate(plan.interfaces):
        netdev, device = nic_options(number, iface.mac)
        argv += ["-netdev", command_line_options(netdev, "type"),
                 "-device", command_line_options(device, "driver")]
    if plan.process.terminal:
        argv += ["-chardev", "stdio,id=con,signal=off",
                 "-device", "virtconsole,bus=ser0.0,nr=0,chardev=con"]
    else:
        argv += ["-chardev", f"file,id=out,path=/proc/self/fd/{stdout_fd}",
                 "-device", f"virtserialport,bus=ser0.0,nr=2,chardev=out,name={paths.PORT_STDOUT}",
                 "-chardev", f"file,id=err,path=/proc/self/fd/{stderr_fd}",
                 "-device", f"virtserialport,bus=ser0.0,nr=3,chardev=err,name={paths.PORT_STDERR}",
                 "-chardev", f"socket,id=in,path={paths.STDIN_SOCKET}",
                 "-device", f"virtserialport,bus=ser0.0,nr=4,chardev=in,name={paths.PORT_STDIN}"]
    return argv + ["-serial", "chardev:console"] + console_and_monitor(plan, stderr_fd)


def restore_argv(plan, vcpus, stdout_fd, stderr_fd, ram_fd, disk_fds=()):
    """QEMU restoring the container's VM from its template (container.restore): the
    template's machine, its RAM the container's own copy (`ram_fd`), waiting for its
    devices' state (restore.resume); the chardevs are this container's, as for a cold
    boot. The export's, the NICs' and the disks' backends are here; their devices are
    hot-plugged once the VM runs (restore_devices)."""
    argv = machine_argv(plan.memory_mib, vcpus, plan.options.accel, plan.tcg_cache_mib,
                        f"memory-backend-file,mem-path=/proc/self/fd/{ram_fd}")
    argv += template_boot_argv(plan.boot.kernel, plan.boot.append) + template_devices()
    argv += ["-chardev", f"socket,id=vfs,path={paths.VIRTIOFS_SOCKET}",
             "-chardev", f"socket,id=ctl,path={paths.CONTROL_SOCKET}"]
    if plan.process.terminal:
        argv += ["-chardev", "stdio,id=con,signal=off"]
        argv += [arg for name in ("out", "err", "in") for arg in ("-chardev", f"null,id={name}")]
    else:
        argv += ["-chardev", "null,id=con",
                 "-chardev", f"file,id=out,path=/proc/self/fd/{stdout_fd}",
                 "-chardev", f"file,id=err,path=/proc/self/fd/{stderr_fd}",
                 "-chardev", f"socket,id=in,path={paths.STDIN_SOCKET}"]
    argv += disk_backends(disk_fds)
    for number, iface in enumerate(plan.interfaces):
        netdev, _ = nic_options(number, iface.mac)
        argv += ["-netdev", command_line_options(netdev, "type")]
    return argv + console_and_monitor(plan, stderr_fd) + ["-incoming", "defer"]


def restore_devices(plan):
    """What a restored VM gets hot-plugged (QMP device_add's arguments), in order: the
    export first (the guest's init waits for it), the NICs, the disks."""
    return ([export_device()]
            + [nic_options(number, iface.mac)[1] for number, iface in enumerate(plan.interfaces)]
            + [disk_device(number, disk) for number, disk in enumerate(plan.disks)])


def export_device(chardev="vfs", tag=paths.VIRTIOFS_TAG, device_id="vfs0"):
    """The export's virtiofs device: the container's own, or a pod member's hot-plugged
    into the pod's VM (container.member_exports), with the same options."""
    return {"driver": "vhost-user-fs-pci", "chardev": chardev, "tag": tag,
            "queue-size": 1024, "id": device_id}


def disk_backends(disk_fds):
    """The DKVM_DISKS files (read-write and read-only fds each) as drives `disk<N>`."""
    argv = []
    for number, (rw_fd, ro_fd) in enumerate(disk_fds):
        argv += ["-add-fd", f"fd={rw_fd},set={number + 1}",
                 "-add-fd", f"fd={ro_fd},set={number + 1}",
                 "-drive", f"file=/dev/fdset/{number + 1},if=none,id=disk{number},"
                           "format=raw,aio=threads,discard=unmap"]
    return argv


def disk_device(number, disk):
    return {"driver": "virtio-blk-pci", "drive": f"disk{number}", "serial": disk.serial,
            "id": f"blk{number}"}


def console_and_monitor(plan, stderr_fd):
    console = f"/proc/self/fd/{stderr_fd}" if plan.options.kernel_debug else paths.CONSOLE_LOG
    return ["-chardev", f"file,id=console,path={console}",
            "-qmp", f"unix:{paths.QMP_SOCKET},server=on,wait=off"]


def netdev_id(number):
    """QEMU's ids for the backend and the NIC of tap `number` (hot-unplug needs them)."""
    return f"net{number}"


def nic_id(number):
    return f"nic{number}"


def nic_options(number, mac):
    """The tap backend and the virtio NIC of tap `number`: the same options on the
    command line at boot and in QMP's netdev_add/device_add when hot-plugged. Without
    the link-status feature the guest's driver finds the carrier on as it probes, so
    the NIC runs the moment it is up; with it, the kernel's link watcher marks it
    running up to a second later (its rate limit), and the workload would wait."""
    netdev = {"type": "tap", "id": netdev_id(number), "ifname": tap_name(number),
              "script": "no", "downscript": "no"}
    device = {"driver": "virtio-net-pci", "netdev": netdev_id(number), "id": nic_id(number),
              "mac": mac, "romfile": "", "status": "off"}
    return netdev, device


def command_line_options(options, first):
    return ",".join([options[first]] + [f"{k}={v}" for k, v in options.items() if k != first])


def qemu_env(root=paths.PAYLOAD_MOUNT):
    """Debian builds the TCG accelerator as a module; point QEMU at the payload's."""
    return {"QEMU_MODULE_DIR": paths.payload_path("qemu", "modules", root=root)}


def virtiofsd_argv(listen_fd, sys_admin=False, nofile=0, source=paths.SHARE_DIR,
                   root=paths.PAYLOAD_MOUNT, coherent=False):
    """virtiofsd serving the export: the image's root with its submounts (volumes,
    /etc/hosts) and the payload for the guest. It takes the listening socket the
    entrypoint made (`listen_fd`: no socket or pidfile of its own to write). The
    namespace sandbox cannot pivot_root under Docker; chroot works with Docker's
    default capabilities. With DKVM_SYS_ADMIN it keeps CAP_SYS_ADMIN, which it drops
    by default.

    cache=always keeps file data cached across opens (execs and imports 2-5x faster
    than cache=auto under TCG); timeout=1 has the guest revalidate names and
    attributes after a second instead of a day, and a changed file's cached data is
    dropped then: what `docker cp`, another container sharing a volume or Docker
    rewriting /etc/hosts change shows in the VM within a second.

    virtiofsd holds a descriptor for each inode the guest knows (until the guest's
    kernel forgets it) and one for each file it has open: `nofile` (its soft and hard
    RLIMIT_NOFILE) is the most the container may have, its hard limit; raising that
    needs CAP_SYS_RESOURCE, which the container side does not have. 0: unchanged.
    Under a low limit, no readdirplus: with it, listing a directory has the guest's
    kernel keep an inode (virtiofsd a descriptor) for every entry at once, 20000 in a
    blink; without it an inode comes with a lookup, at a pace the supervisor's watch
    keeps ahead of (listings are slower: `ls -l` of 3000 files 0.8 s -> 1.3 s).

    `coherent`: a pod's volume (container.pod_volumes), which the host changes too (the
    kubelet, the test of a pod): names and attributes are asked for every time and a
    file's data again at each open (cache=auto, timeout=0), so a file the host removed
    is never written to in its stead."""
    return paths.payload_program_argv(paths.payload_path("qemu", "virtiofsd", root=root), root) + [
        f"--fd={listen_fd}", "-o", f"source={source}",
        "-o", "sandbox=chroot", "-o", "cache=auto" if coherent else "cache=always",
        "-o", "timeout=0" if coherent else "timeout=1",
        "-o", "xattr", *(["-o", "no_readdirplus"] if 0 < nofile < READDIRPLUS_LEAST else []),
        *(["-o", "modcaps=+sys_admin"] if sys_admin else []),
        "-o", "log_level=err", f"--rlimit-nofile={nofile}",
    ]
