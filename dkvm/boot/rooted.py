"""Files inside a tree that is not ours (the image's): every path is resolved as if that
tree were the root, so no link the image holds can lead the opener to a file of its
own (openat2 with RESOLVE_IN_ROOT; magic links refused). Reads are bounded.

Nothing is opened before its type is known: a path is first opened O_PATH (which runs
no driver's open and never blocks on a FIFO), checked from that descriptor, and only a
regular file is then opened for I/O, through /proc/self/fd (the same inode, not the
path again: nothing can be swapped in between)."""
import ctypes
import errno
import os
import stat

SYS_OPENAT2 = 437                         # x86_64
# openat2's resolve flags (linux/openat2.h)
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_IN_ROOT = 0x02, 0x04, 0x10


def open_in_root(root, path, flags, mode=0):
    """An fd for `path` as seen from the directory `root`; raises OSError."""
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return openat2(dirfd, path, flags, mode)
    finally:
        os.close(dirfd)


def openat2(dirfd, path, flags, mode=0, resolve=RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS):
    """An fd for `path` below the directory `dirfd`, resolved as `resolve` says."""
    libc = ctypes.CDLL(None, use_errno=True)
    how = (ctypes.c_uint64 * 3)(flags | os.O_CLOEXEC, mode, resolve)
    fd = libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(path), how, ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def open_regular(root, path, limit, flags=os.O_RDONLY):
    """A regular file of at most `limit` bytes, open with `flags` (O_RDONLY, O_RDWR);
    OSError otherwise."""
    where = open_in_root(root, path, os.O_PATH)
    try:
        return reopen_regular(where, path, limit, flags)
    finally:
        os.close(where)


def open_or_create_regular(root, path, mode, flags=os.O_RDWR):
    """A regular file open with `flags`, made empty (O_EXCL: never through a link, never
    over something there) if there was nothing at `path`; OSError otherwise (also for a
    link to nothing: where the file would go is the image's to choose)."""
    for _ in range(2):          # once more if something appeared between the two opens
        try:
            return open_regular(root, path, 1 << 62, flags)
        except FileNotFoundError:
            pass
        try:
            return open_in_root(root, path, flags | os.O_CREAT | os.O_EXCL | os.O_NOCTTY, mode)
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "a link to nothing (or it keeps changing)", path)


def reopen_regular(where, path, limit, flags):
    """`where` (an O_PATH descriptor) open for I/O, if it is a regular file."""
    info = os.fstat(where)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(0, "not a regular file", path)
    if info.st_size > limit:
        raise OSError(0, f"larger than {limit >> 20} MiB", path)
    return os.open(f"/proc/self/fd/{where}", flags | os.O_NOCTTY | os.O_CLOEXEC)


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
    """The names in a directory (at most `limit`); OSError otherwise. (O_DIRECTORY is
    checked before anything is opened: a device or FIFO is refused unopened.)"""
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
