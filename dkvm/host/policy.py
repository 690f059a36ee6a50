"""The operator's policy file (paths.POLICY_FILE): which option values that weaken the
boundary (settings.PERMISSIONS) a container's environment may set on this host, for
every engine; the way for Podman and containerd, which pass the runtime no arguments.

    {"container_may_set": ["DKVM_SYS_ADMIN"]}

A missing file allows nothing. The runtime reads it as root at every create, so it
reads it only if it is what the operator wrote: a regular file, not a link, owned by
root and writable by nobody else, of bounded size, with nothing in it but known names.
Imported at create, by `install` and by `doctor` only."""
import errno
import os
import stat

from dkvm import paths
from dkvm.errors import DkvmError

KEY = "container_may_set"
DEFAULT_TEXT = '{"%s": []}\n' % KEY
# A list of a few names; a bound on what the runtime reads as root.
MAX_BYTES = 64 << 10


def read_policy(path=None, owner=0):
    """The permissions the policy file grants containers; none without the file."""
    path = path or paths.POLICY_FILE
    text = policy_text(path, owner)
    return frozenset() if text is None else parse_policy(text, path)


def policy_text(path, owner=0):
    """The file's text, or None if there is none; DkvmError if it is not the operator's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DkvmError(f"{path}: cannot read the DKVM policy: {err.strerror}"
                        + (" (a symbolic link?)" if err.errno == errno.ELOOP else "")) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DkvmError(f"{path}: the DKVM policy is not a regular file")
        if info.st_uid != owner or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise DkvmError(f"{path}: the DKVM policy must be owned by root and writable by "
                            "no one else")
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise DkvmError(f"{path}: the DKVM policy is over {MAX_BYTES} bytes")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise DkvmError(f"{path}: the DKVM policy is not ASCII JSON") from None


def parse_policy(text, path):
    """The permissions in the policy's text, parsed strictly: a typo must not pass for a
    policy that allows less, or more, than the operator meant."""
    from dkvm import lightjson
    from dkvm.host.settings import PERMISSIONS
    accepted = (f'accepted: {{"{KEY}": [names]}}, names among {", ".join(PERMISSIONS)}')
    try:
        policy = lightjson.loads(text)
    except ValueError:
        raise DkvmError(f"{path}: the DKVM policy is not valid JSON; {accepted}") from None
    if not isinstance(policy, dict) or set(policy) - {KEY}:
        raise DkvmError(f"{path}: the DKVM policy has an unknown key; {accepted}")
    names = policy.get(KEY, [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise DkvmError(f"{path}: {KEY} must be a list of names; {accepted}")
    for name in names:
        if name not in PERMISSIONS:
            shown = name if len(name) <= 64 and name.isprintable() else repr(name[:64])
            raise DkvmError(f"{path}: {shown} is not a permission; {accepted}")
    return frozenset(names)


def install_default(path=None):
    """`dkvm install`: the default policy (containers set nothing that weakens the
    boundary) where there is none; an operator's own is kept."""
    path = path or paths.POLICY_FILE
    if os.path.lexists(path):
        return f"policy {path} kept"
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(DEFAULT_TEXT)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return f"policy {path} written: containers may set no option that weakens the boundary"


def remove_default(path=None):
    """`dkvm uninstall`: the policy goes if it is still the default (its directory too,
    if then empty); one the operator changed stays."""
    path = path or paths.POLICY_FILE
    try:
        text = policy_text(path)
        if text is None or parse_policy(text, path):
            return None
    except DkvmError:
        return None
    os.remove(path)
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass
    return f"policy {path} removed"


def check_policy(path=None):
    """`dkvm doctor`'s line: what the policy lets containers set."""
    from dkvm.host.settings import ALLOW_ARG, PERMISSIONS
    path = path or paths.POLICY_FILE
    try:
        text = policy_text(path)
        allowed = frozenset() if text is None else parse_policy(text, path)
    except DkvmError as err:
        return "fail", err.message, f"correct it (default: {DEFAULT_TEXT.strip()})"
    operators = [name for name in PERMISSIONS if name not in allowed]
    where = f"no {path}" if text is None else path
    may = ", ".join(sorted(allowed)) or "nothing that weakens the boundary"
    return "ok", (f"policy ({where}): containers may set {may}; the operator's only: "
                  f"{', '.join(operators) or 'none'} (or {ALLOW_ARG} in runtimeArgs)"), ""
