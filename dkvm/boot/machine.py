"""QEMU's machine, as the container side boots it cold and as a template is made on
the host and restored in a container (host.templates, container.restore). A restore
needs the very machine the template was saved from: the same devices in the same
order, the same kernel, initramfs and command line, the same RAM size; only the
backends (chardevs, the RAM's file) differ. So both sides build it here."""
import os

from dkvm import kernel_args, paths

# QEMU's own seccomp filter: none of the system calls it has no use for here
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# A template's guest RAM is a file mapped shared; migration's x-ignore-shared leaves
# it out of the saved state, which is then the devices' alone (about 400 KB). QMP's
# migrate-set-capabilities, on the saving and the restoring QEMU (7.2 has no
# command-line form).
IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]
# Every VM's memory and randomness. Free page reporting: the guest reports the pages it
# frees (2 MiB blocks, after 2 s) and QEMU punches them out of the shared memfd, so a
# container's host memory falls back after a peak instead of staying at it. vmgenid: its
# generation id changes when a VM is restored from a snapshot, and the guest kernel then
# reseeds its RNG (no two restored VMs share random state).
EVERY_VM_DEVICES = ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
                    "-device", "vmgenid,id=vmgenid0"]
# A template's files, in its directory (host.templates makes them, container.restore
# reads them): its manifest, its guest RAM, its devices' saved state
MANIFEST, RAM, STATE = "template.json", "ram", "state"
# The template's virtio-serial ports, by number; the control port is paths.PORT_CONTROL
TEMPLATE_PORTS = ((1, "ctl", paths.PORT_CONTROL), (2, "out", paths.PORT_STDOUT),
                  (3, "err", paths.PORT_STDERR), (4, "in", paths.PORT_STDIN))


def state_digest(state):
    """The saved device state's sha256 (hex), as the template's manifest records it and
    the container side checks it: with the built-in module, not hashlib, which loads
    OpenSSL (3 MiB more in every container's entrypoint)."""
    import _sha256
    return _sha256.sha256(state).hexdigest()


def machine_argv(memory_mib, vcpus, accel, tcg_cache_mib, memory_backend,
                 root=paths.PAYLOAD_MOUNT):
    """QEMU, its machine, CPUs and RAM. `memory_backend`: the RAM's QOM object type
    and its own options (`memory-backend-memfd`, `memory-backend-file,mem-path=...`)."""
    if accel == "kvm":
        accel_options, cpu = ["-accel", "kvm"], "host"
    else:
        cache = f",tb-size={tcg_cache_mib}" if tcg_cache_mib else ""
        accel_options, cpu = ["-accel", f"tcg,thread=multi{cache}"], "max"
    argv = paths.payload_program_argv(
        paths.payload_path("qemu", "qemu-system-x86_64", root=root), root)
    return argv + [
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-sandbox", SANDBOX,
        "-L", paths.payload_path("qemu", "firmware", root=root),
        "-machine", "pc,memory-backend=mem", *accel_options, "-cpu", cpu,
        "-smp", str(vcpus), "-m", f"{memory_mib}M",
        "-object", f"{memory_backend},id=mem,size={memory_mib}M,share=on",
    ]


def boot_options(boot):
    """The kernel, and its initramfs if it has one, from the boot descriptor."""
    return ["-kernel", boot.kernel] + (["-initrd", boot.initrd] if boot.initrd else [])


def template_boot_argv(kernel, append):
    """A template boots a payload kernel (`kernel`: its ELF, where the side running
    QEMU sees it) with the template's initramfs beside it (build.py: the kernel's own
    initramfs, if it has one, then DKVM's init and Python), DKVM's arguments and the
    kernel's own (`append`), quiet: no user's arguments (a container that sets any
    boots cold)."""
    initrd = os.path.join(os.path.dirname(kernel), paths.TEMPLATE_INITRD)
    return ["-kernel", kernel, "-initrd", initrd,
            "-append", " ".join(kernel_args.compose(list(append), False, ""))]


def template_devices():
    """The template's devices: the console and the four ports on one virtio-serial
    bus, with chardevs `con`, `ctl`, `out`, `err` and `in`, and the serial console on
    chardev `console`. No export, NIC or disk: those are hot-plugged at restore."""
    argv = ["-device", "virtio-serial-pci,id=ser0,max_ports=8",
            "-device", "virtconsole,bus=ser0.0,nr=0,chardev=con"]
    for number, chardev, name in TEMPLATE_PORTS:
        argv += ["-device", f"virtserialport,bus=ser0.0,nr={number},chardev={chardev},name={name}"]
    return argv + EVERY_VM_DEVICES + ["-serial", "chardev:console"]
