"""Becoming the container's process in the guest: the same user, groups, working
directory and environment runc would give, and runc's answers when exec fails.
Shared by the workload and by `docker exec`; runs in a freshly forked child."""
import os
import _signal


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


def report_run_failure(message):
    os.write(2, f"dkvm: unable to start container process: {message}\n".encode())


def report_exec_failure(message):
    """As `docker exec` shows a start failure with runc: on stdout, in these words."""
    os.write(1, ("OCI runtime exec failed: exec failed: unable to start container process: "
                 f"{message}: unknown\r\n").encode())


def become_and_exec(stdio, process, report=report_run_failure, failure_status=None):
    """In a forked child: take `stdio` as fds 0-2, become the schema.Process `process`
    (user, groups, cwd, env) and exec its args. Never returns; a failure is reported
    in runc's words with the exit code Docker gives (127 not found, 126 not executable;
    `failure_status` for every failure where Docker has one code, as for exec)."""
    try:
        env = workload_env(process.env, process.uid)
        cwd = process.cwd or "/"
        for sig in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGCHLD):
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.set_wakeup_fd(-1)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        os.setgroups(list(dict.fromkeys(process.additional_gids)))
        os.setgid(process.gid)
        os.setuid(process.uid)
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
