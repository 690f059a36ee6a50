"""How the runtime hands the container side its instructions: the plan at `create`, a
request at each `exec`. Both carry the workload's whole environment, so neither
travels as an environment string (Linux caps one at MAX_ARG_STRLEN, 128 KiB: a big
`-e` failed with "argument list too long" where runc runs it), nor as argv words (a
command line is readable by every user of the host, /proc/PID/cmdline, and the
environment holds what `-e` was given, secrets too).

- create: the plan is a file in the container's own root (paths.SKELETON, which the
  runtime makes in the bundle: read-only to the container, removed with the bundle),
  root's alone, written whole (a new file renamed over the old). The entrypoint reads
  it from its root; `update` reads it there again for the VM's size.
- exec: the request is a memfd that runc hands the relay (`runc exec --preserve-fds`,
  one more than the engine asked for, at the next descriptor), named to the relay by
  number (paths.EXEC_REQUEST_FD). Nothing is written anywhere, so nothing is left
  behind per exec, and the wrapper, which runs for every exec, needs no `runc state`
  to find the bundle. The relay never takes the workload's environment as its own
  (an LD_PRELOAD there would load into the container side).

Both are read only as regular files, their type checked on a descriptor opened
without following a link (O_PATH: no driver's open, no FIFO) before any read, and
with a bound: each reaches the guest as one control-channel frame, so anything
larger than that frame is refused at create or exec, in one line.
"""
import os
import stat

from dkvm import paths
from dkvm.errors import DkvmError

# wire.MAX_PAYLOAD, the largest control-channel frame (a unit test holds them equal):
# not imported, as the runtime's `exec` need not load the protocol
MAX_PAYLOAD = 1 << 20
# The plan is one PLAN frame once the entrypoint has added the container's interfaces,
# their network steps and its rlimits (2.5 KiB for a dual-stack network): this leaves
# room for fifty networks.
MAX_PLAN_BYTES = MAX_PAYLOAD - (128 << 10)
# A request becomes one EXEC_START frame: its process and the terminal's size.
MAX_REQUEST_BYTES = MAX_PAYLOAD - (4 << 10)
PRESERVE_FDS = "--preserve-fds"
FIRST_PRESERVED_FD = 3                  # runc passes stdio, then the preserved ones


def check_size(text, limit, what):
    """`text` (a plan's or request's JSON) if it fits in its frame; DkvmError if not."""
    if len(text) > limit:
        raise DkvmError(f"{what}'s arguments and environment take {len(text) >> 10} KiB as "
                        f"DKVM carries them into the VM, more than its {limit >> 10} KiB")
    return text


def write_plan(root, text):
    """The plan's file in the container's root `root` (a directory the runtime made),
    replaced whole: a reader never sees part of it. Whatever was at the temporary name
    (a link, a FIFO) is removed, not followed."""
    check_size(text, MAX_PLAN_BYTES, "the container")
    path = os.path.join(root, paths.PLAN_FILE)
    tmp = path + ".dkvm-tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "w", closefd=False) as f:
            f.write(text)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def own_plan(root):
    """The entrypoint's plan, from its root `root`, as the runtime wrote it."""
    from dkvm.schema import Plan
    try:
        return Plan.from_json(read_plan(root))
    except (OSError, ValueError) as err:
        raise DkvmError(f"the plan in the container's root cannot be read ({err}): "
                        "was the container created by DKVM's runtime?") from None


def read_plan(root):
    """The plan's JSON text from the container's root `root`; OSError if it is missing,
    a link or not a regular file, or too big to be one DKVM wrote."""
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        where = os.open(paths.PLAN_FILE, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=dirfd)
    finally:
        os.close(dirfd)
    try:
        if not stat.S_ISREG(os.fstat(where).st_mode):
            raise OSError(0, "not a regular file", paths.PLAN_FILE)
        fd = os.open(f"/proc/self/fd/{where}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(where)
    return read_bounded(fd, MAX_PLAN_BYTES, paths.PLAN_FILE)


def read_bounded(fd, limit, name):
    """The text of the regular file open at `fd` (closed here), from its start; at most
    `limit` bytes, else OSError."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file", name)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.pread(fd, min(1 << 20, limit + 1 - size), size)
            if not chunk:
                return b"".join(chunks).decode()
            chunks.append(chunk)
            size += len(chunk)
        raise OSError(0, f"larger than {limit} bytes", name)
    finally:
        os.close(fd)


def request_descriptor(exec_args):
    """(`runc exec`'s arguments after the subcommand, changed to preserve one more
    descriptor, that descriptor's number). The engine's own preserved descriptors keep
    theirs."""
    args, preserved = without_preserve_fds(exec_args)
    return [f"{PRESERVE_FDS}={preserved + 1}"] + args, FIRST_PRESERVED_FD + preserved


def pass_request(target, text):
    """Descriptor `target`, left open for runc (and by runc for the relay), becomes a
    memfd holding `text`, the request; whatever was open there is closed."""
    check_size(text, MAX_REQUEST_BYTES, "the exec")
    data = memoryview(text.encode())
    fd = os.memfd_create("dkvm-exec-request", os.MFD_CLOEXEC)
    try:
        while data:
            data = data[os.write(fd, data):]
        if fd != target:
            os.dup2(fd, target)
        os.set_inheritable(target, True)
    except OSError as err:
        raise DkvmError(f"the exec's request cannot be handed to runc at descriptor "
                        f"{target}: {err.strerror}") from None
    finally:
        if fd != target:
            os.close(fd)


def without_preserve_fds(exec_args):
    """(the arguments less runc's --preserve-fds flag, its count). runc's flags before
    the container id take one dash or two, the value after `=` or as the next word."""
    args, count, words = [], 0, iter(exec_args)
    for arg in words:
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == PRESERVE_FDS.lstrip("-"):
            value = value if eq else next(words, "0")
            if not (value.isascii() and value.isdigit()) or len(value) > 6:
                raise DkvmError(f"{PRESERVE_FDS} {value!r}: not a number of descriptors")
            count = int(value)
        else:
            args.append(arg)
    return args, count


def read_request(fd):
    """The request's JSON text from the descriptor runc handed the relay."""
    return read_bounded(fd, MAX_REQUEST_BYTES, "the exec request")
