"""The payload directory: unpacked once per build from the archive, shared by every
container of that build (read-only bind mount), pruned when no container uses it."""
import fcntl
import os
import shutil
import sys
import tempfile
import zipfile

from dkvm import paths
from dkvm.errors import DkvmError

BOOT_FILE = "boot.json"          # in each kernels/<dist>: a schema.Boot
PAYLOAD_MEMBER = "payload.tar"   # in the archive: the payload (build.write_payload_tar)
PAYLOAD_BUILD_ID = "payload/BUILD_ID"


def archive_path():
    """The dkvm.pyz this process runs from (argv[0] may be a symlink to it)."""
    path = os.path.realpath(sys.argv[0])
    if not zipfile.is_zipfile(path):
        raise DkvmError(f"{sys.argv[0]} is not the dkvm.pyz archive; run the installed "
                        "dkvm.pyz or a symlink to it")
    return path


def build_id(archive=None):
    with zipfile.ZipFile(archive or archive_path()) as zf:
        return zf.read(PAYLOAD_BUILD_ID).decode().strip()


def ensure_payload(archive=None):
    """Unpack the archive's payload to /var/lib/dkvm/<build-id> unless it is there;
    concurrent callers wait on a lock, and the directory appears whole (rename)."""
    archive = archive or archive_path()
    with zipfile.ZipFile(archive) as zf:
        build_id = zf.read(PAYLOAD_BUILD_ID).decode().strip()
        target = paths.host_payload_dir(build_id)
        if os.path.exists(os.path.join(target, "BUILD_ID")):
            return target
        os.makedirs(paths.HOST_STATE_DIR, mode=0o755, exist_ok=True)
        with open(os.path.join(paths.HOST_STATE_DIR, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(os.path.join(target, "BUILD_ID")):
                return target
            tmp = tempfile.mkdtemp(prefix=f".{build_id}.", dir=paths.HOST_STATE_DIR)
            try:
                extract_payload(zf, tmp)
                os.chmod(tmp, 0o755)
                os.rename(tmp, target)
            except BaseException as err:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(err, OSError):
                    need = sum(info.file_size for info in zf.infolist()
                               if info.filename == PAYLOAD_MEMBER) >> 20
                    raise DkvmError(f"cannot unpack DKVM's payload into "
                                    f"{paths.HOST_STATE_DIR}: {err.strerror or err} (it "
                                    f"needs about {need} MB); nothing was left half-unpacked")\
                        from None
                raise
    return target


def prune_payloads(keep=None):
    """Remove the payloads that no container uses, but `keep`'s: each upgrade would
    otherwise leave one behind (about 140 MB). A running container has its payload
    bind-mounted (and is left it); a stopped one gets the current payload when it
    starts again. Returns (removed, in use) build ids."""
    if not os.path.isdir(paths.HOST_STATE_DIR):
        return [], []
    used = payloads_in_use()
    removed, kept = [], []
    for name in sorted(os.listdir(paths.HOST_STATE_DIR)):
        path = os.path.join(paths.HOST_STATE_DIR, name)
        if name == keep or name.startswith(".") or not os.path.isdir(path):
            continue
        if name in used:
            kept.append(name)
            continue
        remove_tree(path)
        removed.append(name)
    return removed, kept


def payloads_in_use():
    """Build ids mounted in any mount namespace (a mount's root names its source)."""
    used, seen = set(), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
            if namespace in seen:
                continue
            seen.add(namespace)
            with open(f"/proc/{pid}/mountinfo") as f:
                for line in f:
                    root = line.split()[3]
                    parent, name = os.path.split(root.rstrip("/"))
                    if os.path.basename(parent) == os.path.basename(paths.HOST_STATE_DIR):
                        used.add(name)
        except OSError:                 # the process is gone, or not ours to read
            continue
    return used


def remove_tree(path):
    """Payload trees are read-only: make each directory writable on the way down."""
    def retry_writable(function, failed, _):
        os.chmod(os.path.dirname(failed), 0o755)
        function(failed)
    shutil.rmtree(path, onerror=retry_writable)


def extract_payload(zf, dest):
    """The archive's payload tar, unpacked as a stream into `dest`, read-only: plain
    directories and files, each inside `dest` (nothing else is in a payload)."""
    import tarfile
    with zf.open(PAYLOAD_MEMBER) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.name.startswith("/") or ".." in parts:
                raise DkvmError(f"the archive's payload names {member.name!r}: not a payload")
            out = os.path.join(dest, *parts)
            if member.isdir():
                os.makedirs(out, exist_ok=True)
            elif member.isfile():
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.chmod(out, member.mode & 0o555)
            else:
                raise DkvmError(f"the archive's payload has {member.name!r}, not a file")


def payload_kernels(payload_dir):
    """The kernels a payload carries: dist -> schema.Boot, with paths as the container
    and the guest see them (under the payload mount). Each kernels/<dist>/boot.json is
    written by build.py with paths relative to its folder."""
    from dkvm.schema import Boot
    kroot = os.path.join(payload_dir, "kernels")
    kernels = {}
    for dist in sorted(os.listdir(kroot)):
        with open(os.path.join(kroot, dist, BOOT_FILE)) as f:
            boot = Boot.from_json(f.read())
        boot.name = dist
        inside = paths.payload_path("kernels", dist)
        for name in ("kernel", "initrd", "modules"):
            if getattr(boot, name):
                setattr(boot, name, os.path.join(inside, getattr(boot, name)))
        kernels[dist] = boot
    return kernels
