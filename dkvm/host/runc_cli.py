"""runc's command line as engines write it, parsed once into a RuncCall: runc's global
flags (DKVM's own taken out), the subcommand and its arguments, the container id, the
bundle, the process file and runc's log file, where the engine looks for the reason
a command failed.

Imported on every docker operation: nothing here imports more than it must."""
from dkvm.errors import DkvmError

# runc's global flags that take a value (the subcommand follows them); urfave/cli
# takes a flag with one dash or two, its value after `=` or as the next word
GLOBAL_VALUE_FLAGS = {"root", "log", "log-format", "criu", "rootless"}
RUNC_ARG = "--dkvm-runc"
DKVM_ARG_PREFIX = "--dkvm-"


class RuncCall:
    """One runtime command line. `global_args`, `command` and `command_args` are what
    runc is given (`command_args` is changed at exec: handoff.request_descriptor);
    `runc` is --dkvm-runc's value ("": find it), `operator` the operator's other
    --dkvm-* values as text ({--dkvm-<option> or --dkvm-allow: text}, read at create:
    settings.parse_settings), `unknown_arg` a --dkvm-* flag DKVM does not know (check
    raises for it, once `log` is known to report it in). `container_id` is the last
    argument (create, exec --process, update, state, delete...) or kill's first;
    `signal` kill's second ("" if none); `bundle` create's (--bundle, or the working
    directory); `process_file` exec's --process ("" if none)."""
    __slots__ = ("global_args", "command", "command_args", "runc", "operator", "unknown_arg",
                 "log", "log_format", "container_id", "signal", "bundle", "process_file")

    def check(self):
        """DkvmError for a --dkvm-* flag DKVM does not know: an operator's typo fails
        every operation, in runc's log, rather than being passed to runc."""
        if self.unknown_arg:
            from dkvm.host.settings import ALLOW_ARG, BY_RUNTIME_ARG, quoted_name
            accepted = ", ".join(sorted([RUNC_ARG, ALLOW_ARG, *BY_RUNTIME_ARG]))
            raise DkvmError(f"unknown runtime argument {quoted_name(self.unknown_arg)}: DKVM "
                            f"accepts {accepted}")

    def flag(self, *names):
        """The value of the subcommand's flag `names` (without dashes: "bundle", "b")."""
        return flag_value(self.command_args, names)

    def runc_args(self):
        """runc's argv after its path: the engine's, less DKVM's flags."""
        return self.global_args + ([self.command] if self.command else []) + self.command_args

    def state_args(self):
        """The global flags for a `runc state` of our own, without runc's log: an error
        there would read as the command's."""
        args, words = [], iter(self.global_args)
        for arg in words:
            name, eq, _ = arg.lstrip("-").partition("=")
            if name in ("log", "log-format"):
                if not eq:
                    next(words, None)
            else:
                args.append(arg)
        return args


def parse(args):
    """The RuncCall of a runtime's argv (without argv[0]). Never fails: an unknown
    --dkvm-* flag is kept for check. DKVM's flags come first (Docker's runtimeArgs),
    all before the subcommand, and each takes a value; an unknown one takes the next
    word unless that is a flag, so that runc's --log after it is still found."""
    call = RuncCall()
    call.global_args, call.command, call.command_args = [], None, []
    call.runc, call.operator, call.unknown_arg = "", {}, ""
    call.log = call.log_format = None
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        i += 1
        if name.startswith(DKVM_ARG_PREFIX):
            if not eq and i < len(args) and (is_dkvm_arg(name) or not args[i].startswith("-")):
                value, i = args[i], i + 1
            take_dkvm_arg(call, name, value)
        elif arg.startswith("-"):
            call.global_args.append(arg)
            bare = name.lstrip("-")
            if bare in GLOBAL_VALUE_FLAGS:
                if not eq and i < len(args):
                    value, i = args[i], i + 1
                    call.global_args.append(value)
                if bare == "log":
                    call.log = value
                elif bare == "log-format":
                    call.log_format = value
        else:
            call.command, call.command_args = arg, args[i:]
            break
    take_command_args(call)
    return call


def is_dkvm_arg(name):
    """A --dkvm-* flag DKVM knows (the options' table is read only for one not --dkvm-runc,
    which Docker passes on every call)."""
    if name == RUNC_ARG:
        return True
    from dkvm.host.settings import ALLOW_ARG, BY_RUNTIME_ARG
    return name == ALLOW_ARG or name in BY_RUNTIME_ARG


def take_dkvm_arg(call, name, value):
    """--dkvm-runc, an operator's value (--dkvm-allow adds up), or the first unknown."""
    if name == RUNC_ARG:
        call.runc = value
        return
    from dkvm.host.settings import ALLOW_ARG
    if not is_dkvm_arg(name):
        call.unknown_arg = call.unknown_arg or name
    elif name == ALLOW_ARG and name in call.operator:
        call.operator[name] += "," + value
    else:
        call.operator[name] = value


def take_command_args(call):
    """What DKVM reads from the subcommand's arguments: the container id (engines put
    it after the flags: last, but kill's `[--all] ID [SIGNAL]`), create's bundle, exec's
    process file."""
    command, args = call.command, call.command_args
    call.signal, call.bundle, call.process_file = "", "", ""
    if command == "kill":
        positional = [arg for arg in args if not arg.startswith("-")]
        call.container_id = positional[0] if positional else ""
        call.signal = positional[1] if len(positional) > 1 else ""
    else:
        last = args[-1] if args else ""
        call.container_id = "" if last.startswith("-") else last
    if command == "create":
        import os
        call.bundle = flag_value(args, ("bundle", "b")) or os.getcwd()
    elif command == "exec":
        call.process_file = flag_value(args, ("process", "p")) or ""


def flag_value(args, names):
    """The value of flag `names` (without dashes) in `args`: `--name value`,
    `--name=value`, one dash or two; None if absent or without a value."""
    for i, arg in enumerate(args):
        if arg.startswith("-"):
            name, eq, value = arg.lstrip("-").partition("=")
            if name in names:
                if eq:
                    return value
                if i + 1 < len(args):
                    return args[i + 1]
    return None


def report_to_runc_log(call, line):
    """containerd reports the last error in runc's --log file; write ours there too
    (in runc's format) so `docker run` shows it, not just 'exit status 1'."""
    if not call.log:
        return
    import json
    import time
    try:
        with open(call.log, "a") as f:
            if call.log_format == "json":
                f.write(json.dumps({"level": "error", "msg": line,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                        + "\n")
            else:
                f.write(line + "\n")
    except OSError:
        pass


STATE_TIMEOUT = 5


def container_pid(runc, call, statuses=("running",)):
    """The PID 1 of the call's container as runc knows it (its own `state`), if the
    container is in one of `statuses`; else 0."""
    state = container_state(runc, call)
    return state.get("pid", 0) if state.get("status") in statuses else 0


def container_state(runc, call):
    """runc's `state` of the call's container (status, pid, bundle, rootfs...); {} if
    runc has none."""
    import json
    import subprocess
    try:
        out = subprocess.run([runc, *call.state_args(), "state", call.container_id],
                             capture_output=True, timeout=STATE_TIMEOUT, check=True).stdout
        state = json.loads(out)
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    return state if isinstance(state, dict) else {}
