"""The runtime's edits to the bundle the engine hands runc: config.json at `create`,
the process file at `exec`. The I/O around the pure rewrites of host.rewrite."""
import json
import os

from dkvm.errors import DkvmError
from dkvm.host import runc_cli


def prepare_create(create_args, defaults):
    from dkvm.host.facts import gather_host_facts
    from dkvm.host.rewrite import rewrite_create_config
    bundle = runc_cli.flag_value(create_args, "--bundle", "-b") or os.getcwd()
    config_path = os.path.join(bundle, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    new = rewrite_create_config(config, gather_host_facts(defaults),
                                runc_cli.container_id(create_args))
    replace_json(config_path, new)


def prepare_exec(exec_args):
    """`runc exec --process FILE`: the process becomes the dkvm-exec relay."""
    from dkvm.host.rewrite import rewrite_exec_process
    path = runc_cli.flag_value(exec_args, "--process", "-p")
    if not path:
        raise DkvmError("exec without --process FILE is not supported by dkvm")
    with open(path) as f:
        process = json.load(f)
    replace_json(path, rewrite_exec_process(process, runc_cli.container_id(exec_args)))


def replace_json(path, data):
    tmp = path + ".dkvm-tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
