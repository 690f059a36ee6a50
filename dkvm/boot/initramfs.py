"""The guest's initramfs, for kernels that keep virtio and virtiofs as modules (Debian's
stock kernel, an image's own): the payload's busybox, DKVM's /init and the modules
that reach the container's export, numbered in the order they load. build.py makes
it for the stock kernel; the container side makes it at start for the image's kernel,
with this same code."""
import io
import stat

from dkvm.errors import DkvmError

# What /init loads to reach the export, the control and stdio ports and the NICs
BOOT_MODULES = ("virtio_pci", "virtiofs", "virtio_console", "virtio_net")
# What /init also loads when the kernel has it: virtio-balloon, whose free page reporting
# gives the host back the memory the guest frees (machine.EVERY_VM_DEVICES); a
# kernel without it boots all the same, keeping what it touched
BOOT_MODULES_IF_PRESENT = ("virtio_balloon",)
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def module_name(filename):
    """`virtio-pci.ko.xz` -> `virtio_pci`: the name the kernel and modprobe use."""
    base = filename.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base.replace("-", "_")


def modinfo_depends(module):
    """The `depends=` list of a module's .modinfo (its bytes, uncompressed)."""
    start = module.find(b"\0depends=")
    if start < 0:
        return []
    field = module[start + len(b"\0depends="):].split(b"\0", 1)[0]
    return [module_name(d) for d in field.decode(errors="replace").split(",") if d]


def load_order(wanted, depends_of, most=None):
    """`wanted` and what they depend on, each after its dependencies (depth first, in
    the order each lists them). `depends_of(name)` gives a module's dependencies, or
    raises KeyError when there is no such module. Iterative (a chain of any depth is
    a list, not a recursion) and linear in the modules and dependencies it meets;
    with `most`, the module after that many is an error at once, so an image's
    modules.dep cannot make this walk long."""
    order, done, on_path, stack = [], set(), set(), []

    def enter(name):
        if most is not None and len(done) + len(on_path) >= most:
            raise DkvmError(f"more than {most} modules to load at boot")
        try:
            depends = depends_of(name)
        except KeyError:
            raise DkvmError(f"the kernel has no module {name}") from None
        on_path.add(name)
        stack.append((name, iter(depends)))

    for name in wanted:
        if name in done:
            continue
        enter(name)
        while stack:
            name, depends = stack[-1]
            for dep in depends:
                if dep in on_path:
                    raise DkvmError(f"module dependency cycle at {dep}")
                if dep not in done:
                    enter(dep)
                    break
            else:
                stack.pop()
                on_path.discard(name)
                done.add(name)
                order.append(name)
    return order


def initramfs(busybox, init, modules):
    """The newc archive: /bin/busybox, /init, and `modules` ([(name, bytes)] in load
    order) as /lib/modules/NN-name.ko, which /init loads in name order."""
    out = io.BytesIO()
    write_initramfs(out, busybox, init, modules)
    return out.getvalue()


def write_initramfs(out, busybox, init, modules):
    """initramfs(), written to the file `out` as it goes: no second copy in memory."""
    entries = [(d, stat.S_IFDIR | 0o755, None)
               for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules")]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, None, (5, 1)))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox))
    for number, (name, data) in enumerate(modules):
        entries.append((f"lib/modules/{number:02d}-{name}.ko", stat.S_IFREG | 0o644, data))
    entries.append(("init", stat.S_IFREG | 0o755, init))
    write_newc(out, entries)


def cpio_newc(entries):
    """A deterministic newc cpio archive: entries are (name, mode, data-or-None[, rdev])."""
    out = io.BytesIO()
    write_newc(out, entries)
    return out.getvalue()


def write_newc(out, entries):
    """cpio_newc(entries), written to the file `out`."""
    written = 0

    def put(data):
        nonlocal written
        out.write(data)
        written += len(data)

    def header(ino, name, mode, size, nlink, rdev=(0, 0)):
        name = name.encode()
        fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, *rdev, len(name) + 1, 0]
        put(b"070701" + b"".join(b"%08X" % f for f in fields))
        put(name + b"\0")
        put(b"\0" * (-written % 4))

    for ino, (name, mode, data, *rdev) in enumerate(entries, start=1):
        data = data or b""
        header(ino, name, mode, len(data), 2 if stat.S_ISDIR(mode) else 1, *rdev)
        put(data)
        put(b"\0" * (-written % 4))
    header(0, "TRAILER!!!", 0, 0, 1)
