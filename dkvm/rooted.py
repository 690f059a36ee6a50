"""Files inside a tree that is not ours (the image's): every path is resolved as if that
tree were the root, so no link the image holds can lead the opener to a file of its
own (openat2 with RESOLVE_IN_ROOT; magic links refused). Reads are bounded."""
import ctypes
import os
import stat

SYS_OPENAT2 = 437                         # x86_64
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10


def open_in_root(root, path, flags, mode=0):
    """An fd for `path` as seen from the directory `root`; raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = (ctypes.c_uint64 * 3)(flags | os.O_CLOEXEC, mode,
                                    RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        fd = libc.syscall(SYS_OPENAT2, dirfd, path.encode(), how, ctypes.sizeof(how))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return fd
    finally:
        os.close(dirfd)


def open_regular(root, path, limit):
    """A regular file of at most `limit` bytes, open for reading; OSError otherwise."""
    fd = open_in_root(root, path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, "not a regular file", path)
        if info.st_size > limit:
            raise OSError(0, f"larger than {limit >> 20} MiB", path)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_file(root, path, limit):
    """The bytes of a regular file (at most `limit`); OSError otherwise."""
    fd = open_regular(root, path, limit)
    try:
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise OSError(0, f"larger than {limit >> 20} MiB", path)
    finally:
        os.close(fd)


def read_head(root, path, count):
    """The first `count` bytes (or fewer) of a regular file of any size."""
    fd = open_regular(root, path, 1 << 62)
    try:
        return os.pread(fd, count, 0)
    finally:
        os.close(fd)


def list_dir(root, path, limit=4096):
    """The names in a directory (at most `limit`); OSError otherwise."""
    fd = open_in_root(root, path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = []
        for entry in os.scandir(fd):
            names.append(entry.name)
            if len(names) > limit:
                raise OSError(0, f"more than {limit} entries", path)
        return sorted(names)
    finally:
        os.close(fd)


def real_path(root, path):
    """Where `path` really is, as a path under `root` (its links resolved in the tree)."""
    fd = open_in_root(root, path, os.O_PATH)
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    root = os.path.realpath(root)
    if where != root and not where.startswith(root.rstrip("/") + "/"):
        raise OSError(0, "outside the tree", path)
    return where
