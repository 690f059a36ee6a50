"""DKVM_KERNEL=image: the kernel the image carries, for testing kernels.

The image's tree is data here: every file is read through dkvm.rooted (resolved
inside the tree, bounded), nothing in it is run, and what the guest boots stays in
the guest. At create the runtime finds the kernel (/vmlinuz, /boot/vmlinuz, or the
newest /boot/vmlinuz-*, its release read from the bzImage header) and records which;
at start the container side opens that file for QEMU and builds the initramfs from
the image's own /lib/modules/<release> (the virtio and virtiofs modules DKVM needs
at boot; whatever else the kernel loads later, the guest finds in the image)."""
import os

from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.initramfs import BOOT_MODULES, initramfs, load_order, module_name
from dkvm.rooted import list_dir, open_regular, read_file, read_head, real_path

KERNEL_LIMIT = 512 << 20
MODULE_LIMIT = 64 << 20          # one module, compressed or not
INDEX_LIMIT = 16 << 20           # modules.dep, modules.builtin
HEADER = 64 << 10
MOST_KERNELS = 64                # /boot/vmlinuz-* looked at, newest first
KERNEL_PATHS = ("/vmlinuz", "/boot/vmlinuz")


def bzimage_release(header):
    """The release a bzImage names in its setup header (x86 boot protocol: "HdrS" at
    0x202, the version string's offset, less 0x200, at 0x20e), or "" for anything else."""
    if len(header) < 0x210 or header[0x202:0x206] != b"HdrS":
        return ""
    offset = int.from_bytes(header[0x20E:0x210], "little")
    if not offset:
        return ""
    text = header[offset + 0x200:offset + 0x200 + 256].split(b"\0")[0]
    words = text.decode("ascii", "replace").split()
    release = words[0] if words else ""
    return release if release.isprintable() and "/" not in release and release.strip(".") \
        else ""


def kernels_in(root):
    """[(path in the image, release)]: the default kernel first (/vmlinuz, /boot/vmlinuz),
    then /boot/vmlinuz-* newest first."""
    try:
        names = [name for name in list_dir(root, "/boot") if name.startswith("vmlinuz-")]
    except OSError:
        names = []
    names = sorted(names, key=version_key, reverse=True)[:MOST_KERNELS]
    found = []
    for path in (*KERNEL_PATHS, *(f"/boot/{name}" for name in names)):
        try:
            release = bzimage_release(read_head(root, path, HEADER))
        except OSError:
            continue
        if release:
            found.append((path, release))
    return found


def find_kernel(root, release=""):
    """(path, release) of the image's kernel: the default one, or the one of `release`."""
    found = kernels_in(root)
    for path, its_release in found:
        if not release or its_release == release:
            return path, its_release
    if not found:
        raise DkvmError("DKVM_KERNEL=image: the image has no kernel (a bzImage at /vmlinuz, "
                        "/boot/vmlinuz or /boot/vmlinuz-<release>)")
    releases = ", ".join(sorted({r for _, r in found}))
    raise DkvmError(f"DKVM_KERNEL=image/{release}: the image has no such kernel; "
                    f"it has {releases}")


def version_key(name):
    """Names ordered by the numbers in them, as numbers (`-10-` after `-9-`)."""
    key, digits = [], ""
    for char in name + "\0":
        if char.isdigit():
            digits += char
            continue
        if digits:
            key.append((1, int(digits), ""))
            digits = ""
        key.append((0, 0, char))
    return key


def open_kernel(root, path, release):
    """An fd for the kernel found at create (it must still say the same release)."""
    try:
        fd = open_regular(root, path, KERNEL_LIMIT)
    except OSError as err:
        raise DkvmError(f"DKVM_KERNEL=image: cannot open the image's {path}: "
                        f"{err.strerror}") from None
    if bzimage_release(os.pread(fd, HEADER, 0)) != release:
        os.close(fd)
        raise DkvmError(f"DKVM_KERNEL=image: the image's {path} is no longer {release}")
    return fd


def modules_dir(root, release):
    """The image's /lib/modules/<release>, as a real path under `root` (the guest sees
    the export at the same path)."""
    try:
        return real_path(root, f"/lib/modules/{release}")
    except OSError:
        raise DkvmError(f"DKVM_KERNEL=image: the image has no /lib/modules/{release} for its "
                        f"kernel {release}") from None


def boot_initramfs(root, release, busybox, init):
    """The initramfs for the image's kernel: DKVM's busybox and /init, and the boot
    modules the kernel does not have built in, from the image, uncompressed."""
    base = f"/lib/modules/{release}"
    builtin = set(map(module_name, read_index(root, f"{base}/modules.builtin", False).split()))
    files, depends = {}, {}
    for line in read_index(root, f"{base}/modules.dep", True).splitlines():
        path, _, deps = line.partition(":")
        name = module_name(path)
        files[name] = path.strip()
        depends[name] = [module_name(dep) for dep in deps.split()]
    wanted = [name for name in BOOT_MODULES if name not in builtin]
    try:
        order = load_order(wanted, depends.__getitem__)
    except DkvmError as err:
        raise DkvmError(f"DKVM_KERNEL=image: {release}: {err}") from None
    modules = []
    for name in order:
        modules.append((name, module_bytes(root, f"{base}/{files[name]}")))
    return initramfs(busybox, init, modules)


def read_index(root, path, required):
    try:
        return read_file(root, path, INDEX_LIMIT).decode("utf-8", "replace")
    except FileNotFoundError:
        if required:
            raise DkvmError(f"DKVM_KERNEL=image: the image has no {path} "
                            "(run depmod in the image)") from None
        return ""
    except OSError as err:
        raise DkvmError(f"DKVM_KERNEL=image: cannot read the image's {path}: "
                        f"{err.strerror}") from None


def module_bytes(root, path):
    """A module file, uncompressed (xz, gzip), at most MODULE_LIMIT either way."""
    try:
        data = read_file(root, path, MODULE_LIMIT)
    except OSError as err:
        raise DkvmError(f"DKVM_KERNEL=image: cannot read the image's {path}: "
                        f"{err.strerror}") from None
    if path.endswith(".ko"):
        return data
    import lzma
    import zlib
    if path.endswith(".ko.xz"):
        unpacker = lzma.LZMADecompressor()
    elif path.endswith(".ko.gz"):
        unpacker = zlib.decompressobj(wbits=31)
    else:
        raise DkvmError(f"DKVM_KERNEL=image: {path}: only .ko, .ko.xz and .ko.gz modules are "
                        "supported")
    try:
        out = unpacker.decompress(data, MODULE_LIMIT + 1)
    except (lzma.LZMAError, zlib.error, EOFError) as err:
        raise DkvmError(f"DKVM_KERNEL=image: {path} does not decompress: {err}") from None
    if len(out) > MODULE_LIMIT:
        raise DkvmError(f"DKVM_KERNEL=image: {path} is larger than {MODULE_LIMIT >> 20} MiB")
    return out


def prepare_boot(boot, root=paths.SHARED_ROOTFS):
    """At container start: the image's kernel open for QEMU (`boot.kernel` becomes the
    path QEMU opens it by), its initramfs written to the container's private /run, and
    where the guest finds its modules (the guest sees the export at the same path).
    Returns the fd QEMU must inherit."""
    with open(paths.payload_path("bin", "busybox"), "rb") as f:
        busybox = f.read()
    with open(paths.payload_path(paths.GUEST_INIT_DIR, "init"), "rb") as f:
        init = f.read()
    image = boot_initramfs(root, boot.release, busybox, init)
    boot.modules = os.path.dirname(modules_dir(root, boot.release))
    fd = os.open(paths.IMAGE_INITRD, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(image)
    fd = open_kernel(root, boot.kernel, boot.release)
    boot.kernel, boot.initrd = f"/proc/self/fd/{fd}", paths.IMAGE_INITRD
    return fd
