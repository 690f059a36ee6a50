"""DKVM_KERNEL=image: the kernel the image carries, for testing kernels.

The image's tree is data here: every file is read through dkvm.boot.rooted (resolved
inside the tree, bounded), nothing in it is run, and what the guest boots stays in
the guest. At create the runtime finds the kernel (/vmlinuz, /boot/vmlinuz, or the
newest /boot/vmlinuz-*, its release read from the bzImage header) and records which;
at start the container side opens that file for QEMU and builds the initramfs from
the image's own /lib/modules/<release> (the virtio and virtiofs modules DKVM needs
at boot; whatever else the kernel loads later, the guest finds in the image)."""
import os

from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.boot.initramfs import (BOOT_MODULES, BOOT_MODULES_IF_PRESENT, initramfs, load_order,
                                 module_name, write_initramfs)
from dkvm.boot.rooted import list_dir, open_regular, read_file, read_head, real_path

KERNEL_LIMIT = 512 << 20
# The initramfs goes to the container's /run, a 16 MiB tmpfs that also holds its sockets
# and logs; its files (busybox, init, the boot modules uncompressed) total at most this.
# Debian's stock kernel needs 3 MiB.
INITRAMFS_LIMIT = 12 << 20
MOST_BOOT_MODULES = 64           # the boot modules and what they need: 6-10 on real kernels
INDEX_LIMIT = 8 << 20            # modules.dep, modules.builtin: Debian's kernel, ~0.5 MiB
MOST_INDEX_LINES = 1 << 16       # Debian's kernel has 4000 modules, allmodconfig ~9000
LZMA_MEMORY = 64 << 20           # xz's decoder (kernel modules use a 1-2 MiB dictionary)
READ_CHUNK = 1 << 16
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
    budget = INITRAMFS_LIMIT - len(busybox) - len(init)
    return initramfs(busybox, init, boot_modules(root, release, budget))


def boot_modules(root, release, budget):
    """[(name, bytes)] of the boot modules the kernel does not have built in and what
    they need, in load order, uncompressed: at most MOST_BOOT_MODULES of them, and
    `budget` bytes in all (what is held in memory, and what the initramfs adds). The
    image's indexes are bounded too, and read in one linear pass: whatever the image
    holds, this takes well under a second."""
    base = f"/lib/modules/{release}"
    builtin = {module_name(line) for line in read_index(root, f"{base}/modules.builtin", False)}
    entries = {}
    for line in read_index(root, f"{base}/modules.dep", True):
        path, _, deps = line.partition(":")
        entries[module_name(path.strip())] = (path.strip(), deps)

    def depends_of(name):
        return [module_name(dep) for dep in entries[name][1].split()]
    wanted = [name for name in BOOT_MODULES if name not in builtin]
    wanted += [name for name in BOOT_MODULES_IF_PRESENT if name in entries and name not in builtin]
    try:
        order = load_order(wanted, depends_of, MOST_BOOT_MODULES)
    except DkvmError as err:
        raise DkvmError(f"DKVM_KERNEL=image: {release}: {err}") from None
    modules = []
    for name in order:
        data = module_bytes(root, f"{base}/{entries[name][0]}", budget)
        budget -= len(data)
        modules.append((name, data))
    return modules


def read_index(root, path, required):
    """The lines of one of the image's module indexes (modules.dep, modules.builtin)."""
    try:
        data = read_file(root, path, INDEX_LIMIT)
    except FileNotFoundError:
        if required:
            raise DkvmError(f"DKVM_KERNEL=image: the image has no {path} "
                            "(run depmod in the image)") from None
        return []
    except OSError as err:
        raise DkvmError(f"DKVM_KERNEL=image: cannot read the image's {path}: "
                        f"{err.strerror}") from None
    if data.count(b"\n") > MOST_INDEX_LINES:
        raise DkvmError(f"DKVM_KERNEL=image: the image's {path} has more than "
                        f"{MOST_INDEX_LINES} lines")
    # latin-1: one byte a character whatever the bytes (module names are ASCII)
    lines = (line.strip() for line in data.decode("latin-1").split("\n"))
    return [line for line in lines if line]


def module_bytes(root, path, limit):
    """A module file, uncompressed (xz, gzip), read and unpacked a chunk at a time: at
    most `limit` bytes either way, and never more than that held."""
    import lzma
    import zlib
    if path.endswith(".ko"):
        unpacker = None
    elif path.endswith(".ko.xz"):
        unpacker = lzma.LZMADecompressor(memlimit=LZMA_MEMORY)
    elif path.endswith(".ko.gz"):
        unpacker = zlib.decompressobj(wbits=31)
    else:
        raise DkvmError(f"DKVM_KERNEL=image: {path}: only .ko, .ko.xz and .ko.gz modules are "
                        "supported")
    too_large = DkvmError(f"DKVM_KERNEL=image: the initramfs would be larger than "
                          f"{INITRAMFS_LIMIT >> 20} MiB (the container's /run holds 16 MiB) "
                          f"with {path}")
    try:
        fd = open_regular(root, path, 1 << 62)
    except OSError as err:
        raise DkvmError(f"DKVM_KERNEL=image: cannot read the image's {path}: "
                        f"{err.strerror}") from None
    out, read = bytearray(), 0
    try:
        while unpacker is None or not unpacker.eof:
            chunk = os.read(fd, READ_CHUNK)
            read += len(chunk)
            if read > limit:
                raise too_large
            if not chunk:
                if unpacker is not None:
                    raise DkvmError(f"DKVM_KERNEL=image: {path} does not decompress: "
                                    "it ends early")
                break
            out += chunk if unpacker is None else unpacker.decompress(chunk, limit + 1 - len(out))
            if len(out) > limit:
                raise too_large
    except (lzma.LZMAError, zlib.error, EOFError) as err:
        raise DkvmError(f"DKVM_KERNEL=image: {path} does not decompress: {err}") from None
    except OSError as err:
        raise DkvmError(f"DKVM_KERNEL=image: cannot read the image's {path}: "
                        f"{err.strerror}") from None
    finally:
        os.close(fd)
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
    modules = boot_modules(root, boot.release, INITRAMFS_LIMIT - len(busybox) - len(init))
    boot.modules = os.path.dirname(modules_dir(root, boot.release))
    try:
        fd = os.open(paths.IMAGE_INITRD, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as f:
            write_initramfs(f, busybox, init, modules)
    except OSError as err:
        raise DkvmError(f"DKVM_KERNEL=image: cannot write its initramfs to the container's "
                        f"/run: {err.strerror}") from None
    fd = open_kernel(root, boot.kernel, boot.release)
    boot.kernel, boot.initrd = f"/proc/self/fd/{fd}", paths.IMAGE_INITRD
    return fd
