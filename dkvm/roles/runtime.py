"""dkvm-runtime: the OCI runtime dockerd calls. It edits what `create` is given and
then becomes runc; every other subcommand reaches runc untouched.

Imports stay inside functions: this runs on every docker operation.
"""
import os

# runc's global flags that take a value (the subcommand follows them)
GLOBAL_VALUE_FLAGS = {"--root", "--log", "--log-format", "--criu", "--rootless"}


def main(argv):
    args, defaults = argv[1:], {}
    try:
        if any(arg.startswith("--dkvm-") for arg in args):
            from dkvm.options import split_runtime_args
            args, defaults = split_runtime_args(args)
        command, index = find_subcommand(args)
        if command == "create":
            prepare_create(args[index + 1:], defaults)
        elif command == "exec":
            prepare_exec(args[index + 1:])
    except Exception as err:
        report_to_runc_log(args, getattr(err, "message", None) or f"dkvm: {err!r}")
        raise
    from dkvm.host import find_runc
    runc = find_runc(defaults.get("runc", ""))
    os.execv(runc, [runc] + args)


def find_subcommand(args):
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


def prepare_create(create_args, defaults):
    import json
    from dkvm import host
    from dkvm.rewrite import HostFacts, rewrite_create_config

    bundle = flag_value(create_args, "--bundle", "-b") or os.getcwd()
    config_path = os.path.join(bundle, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    payload_dir = host.ensure_payload()
    facts = HostFacts(payload_dir=payload_dir, kvm_usable=host.kvm_usable(),
                      kernels=host.payload_kernels(payload_dir), defaults=defaults,
                      dns_upstream=host.upstream_nameservers())
    new = rewrite_create_config(config, facts)
    tmp = config_path + ".dkvm-tmp"
    with open(tmp, "w") as f:
        json.dump(new, f)
    os.replace(tmp, config_path)


def prepare_exec(exec_args):
    """`runc exec --process FILE`: the process becomes the dkvm-exec relay."""
    import json
    from dkvm.errors import DkvmError
    from dkvm.rewrite import rewrite_exec_process

    path = flag_value(exec_args, "--process", "-p")
    if not path:
        raise DkvmError("exec without --process FILE is not supported by dkvm")
    with open(path) as f:
        process = json.load(f)
    tmp = path + ".dkvm-tmp"
    with open(tmp, "w") as f:
        json.dump(rewrite_exec_process(process), f)
    os.replace(tmp, path)


def report_to_runc_log(args, message):
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
                f.write(json.dumps({"level": "error", "msg": f"dkvm: {message}",
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                        + "\n")
            else:
                f.write(f"dkvm: {message}\n")
    except OSError:
        pass
