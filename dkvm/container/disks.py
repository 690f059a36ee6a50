"""DKVM_DISKS on the container side: each backing file opened inside the image's
tree (its links resolved as if that tree were the root: nothing the image holds can
point the container side at a file of its own, and nothing but a regular file is
ever opened: a device node or FIFO there is refused unopened), made sparse at its size and
formatted by the payload's mke2fs on first use, and handed to QEMU as an open file.
The guest mounts it; the container side never reads what is on it."""
import os
import stat
import subprocess

from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.boot.rooted import open_or_create_regular

FORMAT_TIMEOUT = 120


def open_disks(disks, root=paths.SHARED_ROOTFS):
    """For each schema.Disk, formatted if it was new: the file open read-write and
    read-only (QEMU takes from the pair the one whose mode it asks for)."""
    fds = []
    try:
        for disk in disks:
            fd = open_disk(disk, root)
            fds.append((fd, os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)))
    except BaseException:
        for fd in (fd for pair in fds for fd in pair):
            os.close(fd)
        raise
    return fds


def open_disk(disk, root):
    try:
        fd = open_or_create_regular(root, disk.file, 0o600)
    except OSError as err:
        raise DkvmError(f"DKVM_DISKS: cannot open {disk.file} in the container: "
                        f"{err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DkvmError(f"DKVM_DISKS: {disk.file} is not a regular file")
        if info.st_size == 0:
            os.ftruncate(fd, disk.size)
            format_disk(fd, disk)
        return fd
    except BaseException:
        os.close(fd)
        raise


def format_disk(fd, disk):
    """mke2fs on the open file; on failure the file is emptied, not left half-made:
    the next start tries again."""
    argv = paths.payload_program_argv(paths.payload_path("bin", "mke2fs")) + [
        "-q", "-F", "-t", disk.filesystem, "-E", "lazy_itable_init=1,lazy_journal_init=1",
        f"/proc/self/fd/{fd}"]
    try:
        done = subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True,
                              timeout=FORMAT_TIMEOUT)
        failure = done.returncode and " ".join((done.stderr or done.stdout).split())[:300]
    except subprocess.TimeoutExpired:
        failure = f"it took over {FORMAT_TIMEOUT}s"
    if failure:
        os.ftruncate(fd, 0)
        raise DkvmError(f"DKVM_DISKS: formatting {disk.file} failed: {failure}")
