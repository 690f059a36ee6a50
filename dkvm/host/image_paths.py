"""Where a mount destination really is in the image, as runc resolves it in a
container whose root is the image: symlinks followed inside the image (an absolute
link starts again at the image's root, `..` stops there), through the bind mounts
made before it. DKVM's container root is not the image, so DKVM resolves each
destination itself and hands runc a path with no link in it: a link in the image can
then never point a mount at the container side's own files. Where the image is
read-only, DKVM also makes the mount points runc could not, never following a link."""
import os
import stat

from dkvm.errors import DkvmError

MAX_LINKS = 40


def host_location(image_root, binds, path):
    """(host directory, path below it) of an image path, through the earlier binds
    ((destination, host source) pairs): the longest destination containing it wins."""
    for dest, source in sorted(binds, key=lambda bind: len(bind[0]), reverse=True):
        if path == dest or path.startswith(dest.rstrip("/") + "/"):
            return source, path[len(dest):]
    return image_root, path


def real_destination(image_root, destination, binds=()):
    """The destination's path in the image with every link resolved. A path that does
    not exist (yet) resolves as written: runc creates it."""
    todo = [part for part in destination.split("/") if part]
    resolved, links = [], 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        host = "".join(host_location(image_root, binds, "/" + "/".join(resolved + [part])))
        try:
            info = os.lstat(host)
        except OSError:
            resolved.append(part)
            continue
        if not stat.S_ISLNK(info.st_mode):
            resolved.append(part)
            continue
        links += 1
        if links > MAX_LINKS:
            raise DkvmError(f"mount destination {destination}: too many symbolic links in "
                            "the image")
        target = os.readlink(host)
        if target.startswith("/"):
            resolved = []
        todo = [p for p in target.split("/") if p] + todo
    real = "/" + "/".join(resolved)
    if not is_utf8(real):
        shown = os.fsencode(real).decode("utf-8", "backslashreplace")
        raise DkvmError(f"mount destination {destination}: the image's links lead it to "
                        f"{shown}, a name that is not UTF-8, which DKVM cannot give runc "
                        "(an OCI config is UTF-8)")
    return real


def is_utf8(path):
    """False for a name with bytes that are not UTF-8 (os.readlink gives them as lone
    surrogates): in the OCI config's JSON runc would read another name."""
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def make_mount_point(image_root, binds, path, directory=True):
    """Create the mount point `path` (already resolved) in the image, a directory at
    a time below the directory that holds it, never through a link: one appearing
    since it was resolved (a volume another container writes) is refused. Nothing in
    the image is opened (directories are held O_PATH, a file is made by mknod): a
    FIFO or a device already there is left as it is, and runc mounts on it, as it
    does in a runc container."""
    base, below = host_location(image_root, binds, path)
    parts = [part for part in below.split("/") if part]
    fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                if last and not directory:
                    os.mknod(part, stat.S_IFREG | 0o644, dir_fd=fd)
                    return
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                if last and not is_link(fd, part):
                    return          # something there: runc mounts on it (or says why not)
            except OSError as err:
                raise DkvmError(f"cannot make the mount point {path} in the image: "
                                f"{part}: {err.strerror}") from None
            try:
                next_fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, dir_fd=fd)
            except OSError as err:
                reason = "a symbolic link" if is_link(fd, part) else err.strerror
                raise DkvmError(f"cannot make the mount point {path} in the image: "
                                f"{part}: {reason}") from None
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)


def is_link(dir_fd, name):
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
