"""Becoming the container's process in the guest: the same user, groups, working
directory, environment, limits and privileges runc would give, and runc's answers
when exec fails. Shared by the workload and by `docker exec`; runs in a freshly
forked child."""
import os
import _signal

from dkvm.guest import syscalls
from dkvm.kernel_names import CAPABILITIES, CAPABILITY_NUMBERS, RLIMIT_NUMBERS
from dkvm.log import printable
from dkvm.schema import CAPABILITY_SETS


class ExecError(Exception):
    def __init__(self, message, status):
        super().__init__(message)
        self.message, self.status = message, status


def workload_env(env_list, uid):
    """The process env as a dict, with HOME as runc sets it when nothing else did."""
    env = dict(item.partition("=")[::2] for item in env_list)
    env.setdefault("HOME", home_of(uid))
    return env


def home_of(uid, passwd="/etc/passwd"):
    try:
        with open(passwd) as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[2] == str(uid):
                    return fields[5] or "/"
    except OSError:
        pass
    return "/"


def resolve(name, search_path):
    """Find the program as runc does: a name with a slash is a path, else $PATH."""
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in search_path.split(":")]
    for cand in candidates:
        if os.path.isfile(cand):
            if not os.access(cand, os.X_OK):
                raise ExecError(f'exec: "{name}": permission denied', 126)
            return cand
    if "/" in name:
        if os.path.isdir(name):
            raise ExecError(f'exec: "{name}": permission denied', 126)
        raise ExecError(f'exec: "{name}": stat {name}: no such file or directory', 127)
    raise ExecError(f'exec: "{name}": executable file not found in $PATH', 127)


def capability_masks(capabilities, last_cap):
    """The schema.Capabilities as bitmasks: (bounding set, {the other four} or None).
    The VM's full root changes nothing: (None, None). Dropped capabilities leave the
    bounding set only, and root's execve gives it the rest (a user gets none, as
    under runc); exact sets are set, all five."""
    def mask(names):
        return sum(1 << CAPABILITY_NUMBERS[name] for name in names)
    if capabilities.exact:
        return mask(capabilities.bounding), {name: mask(getattr(capabilities, name))
                                             for name in CAPABILITY_SETS[1:]}
    if capabilities.drop:
        return ((1 << (last_cap + 1)) - 1) & ~mask(capabilities.drop), None
    return None, None


def last_capability():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


def apply_limits(process):
    """rlimits and the OOM score, while this process still has the privilege to raise
    them (runc sets them before it changes user)."""
    for limit in process.rlimits:
        syscalls.set_rlimit(RLIMIT_NUMBERS[limit.type], limit.soft, limit.hard)
    if process.oom_score_adj:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(process.oom_score_adj))


def bounding_set(pid="self"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    raise OSError(f"no CapBnd in /proc/{pid}/status")


def limit_bounding_set(mask, last_cap):
    """Drop what the bounding set has beyond `mask` (an exec limits it twice: to the
    workload's, then to its own; each call costs under TCG)."""
    extra = bounding_set() & ~mask
    for cap in range(last_cap + 1):
        if extra >> cap & 1:
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)


def become_user(process):
    """Change to the process's user with the capabilities it is to have: the bounding
    set before the change, the others after it, as runc does; no-new-privileges last.
    A bounding set beyond the one this process has (an exec's, beyond its
    container's: `docker exec --privileged`) is refused in runc's words."""
    last_cap = last_capability()
    bounding, sets = capability_masks(process.capabilities, last_cap)
    wanted = (1 << (last_cap + 1)) - 1 if bounding is None else bounding
    if wanted & ~bounding_set():
        raise ExecError("unable to apply caps: operation not permitted", 126)
    if bounding is not None:
        limit_bounding_set(bounding, last_cap)
    if sets is not None:
        syscalls.prctl(syscalls.PR_SET_KEEPCAPS, 1)
    os.setgroups(list(dict.fromkeys(process.additional_gids)))
    os.setgid(process.gid)
    os.setuid(process.uid)
    if sets is not None:
        syscalls.capset(sets["effective"], sets["permitted"], sets["inheritable"])
        for cap in range(last_cap + 1):
            if sets["ambient"] >> cap & 1:
                syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_RAISE, cap)
    if process.no_new_privileges:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


def report_run_failure(message):
    """The message names the image's files: as visible text (log.printable)."""
    os.write(2, f"dkvm: unable to start container process: {printable(message)}\n".encode())


def report_exec_failure(message):
    """As `docker exec` shows a start failure with runc: on stdout, in these words."""
    os.write(1, ("OCI runtime exec failed: exec failed: unable to start container process: "
                 f"{printable(message)}: unknown\r\n").encode())


def become_and_exec(stdio, process, report=report_run_failure, failure_status=None,
                    enter_user_namespace=None):
    """In a forked child: take `stdio` as fds 0-2, become the schema.Process `process`
    (limits, user, groups, capabilities, cwd, env) and exec its args. Never returns; a
    failure is reported in runc's words with the exit code Docker gives (127 not
    found, 126 not executable; `failure_status` for every failure where Docker has
    one code, as for exec). `enter_user_namespace` runs between the limits (raising
    one takes the VM's root) and the change of user."""
    try:
        env = workload_env(process.env, process.uid)
        cwd = process.cwd or "/"
        for sig in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGCHLD):
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.set_wakeup_fd(-1)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        apply_limits(process)
        if enter_user_namespace:
            enter_user_namespace()
        become_user(process)
        try:
            os.chdir(cwd)
        except OSError as err:
            raise ExecError(f'chdir to cwd ("{cwd}") set in config.json failed: '
                            f'{os.strerror(err.errno).lower()}', 126) from None
        os.execve(resolve(process.args[0], env.get("PATH", "")), process.args, env)
    except ExecError as err:
        report(err.message)
        os._exit(failure_status or err.status)
    except BaseException as err:
        report(str(err))
        os._exit(failure_status or (126 if isinstance(err, PermissionError) else 127))
