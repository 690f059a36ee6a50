"""runc's command line as engines write it: the subcommand, its flags, the container
id, DKVM's own global flags (from the runtime's `runtimeArgs`), and runc's log file,
where the engine looks for the reason a command failed.

Imported on every docker operation: nothing here imports more than it must."""
from dkvm.errors import DkvmError

# runc's global flags that take a value (the subcommand follows them)
GLOBAL_VALUE_FLAGS = {"--root", "--log", "--log-format", "--criu", "--rootless"}
RUNC_ARG = "--dkvm-runc"


def find_subcommand(args):
    """(subcommand, its index), or (None, len(args))."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in GLOBAL_VALUE_FLAGS:
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return arg, i
    return None, len(args)


def flag_value(args, *names):
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1:]
    return None


def container_id(command_args):
    """The id `create` and `exec --process` name last (engines put it after the flags)."""
    last = command_args[-1] if command_args else ""
    return "" if last.startswith("-") else last


def split_runtime_args(argv):
    """Remove DKVM's own global flags from a runtime command line: returns (argv for
    runc, the runc to run or "", {option attr: host-wide default})."""
    from dkvm.options import OPTIONS
    by_arg = {option.runtime_arg: option for option in OPTIONS if option.runtime_arg}
    rest, runc, defaults = [], "", {}
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name == RUNC_ARG or name in by_arg:
            if not eq:
                value = next(args, "")
            if name == RUNC_ARG:
                runc = value
            else:
                option = by_arg[name]
                defaults[option.attr] = option.kind.parse(name, value, None)
        elif name.startswith("--dkvm-"):
            accepted = ", ".join(sorted([RUNC_ARG, *by_arg]))
            raise DkvmError(f"unknown runtime argument {name}: DKVM accepts {accepted}")
        else:
            rest.append(arg)
    return rest, runc, defaults


def report_to_runc_log(args, line):
    """containerd reports the last error in runc's --log file; write ours there too
    (in runc's format) so `docker run` shows it, not just 'exit status 1'."""
    log = flag_value(args, "--log")
    if not log:
        return
    import json
    import time
    try:
        with open(log, "a") as f:
            if flag_value(args, "--log-format") == "json":
                f.write(json.dumps({"level": "error", "msg": line,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                        + "\n")
            else:
                f.write(line + "\n")
    except OSError:
        pass


STATE_TIMEOUT = 5


def container_pid(runc, global_args, container, statuses=("running",)):
    """The container's PID 1 as runc knows it (its own `state`), if the container is
    in one of `statuses`; else 0. (Without runc's log: an error there would read as
    the command's.)"""
    import json
    import subprocess
    args, skip = [], False
    for arg in global_args:
        if skip:
            skip = False
        elif arg in ("--log", "--log-format"):
            skip = True
        elif not arg.startswith(("--log=", "--log-format=")):
            args.append(arg)
    try:
        out = subprocess.run([runc, *args, "state", container], capture_output=True,
                             timeout=STATE_TIMEOUT, check=True).stdout
        state = json.loads(out)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0
    return state.get("pid", 0) if state.get("status") in statuses else 0
