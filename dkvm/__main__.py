"""One file, several roles: the basename of argv[0] picks which one runs."""
import os
import sys

# Each role is one name: the program `dkvm-<role>` runs the module dkvm.roles.<role>
# (dashes as underscores), and log lines say `dkvm[<role> <container>]`. Any other
# program name is the host CLI.
ROLES = ("runtime", "ctr-entrypoint", "vm-init", "exec-relay", "pod-member")
PROGRAM_PREFIX = "dkvm-"
CLI = ("", "dkvm.roles.cli")


def program(role):
    return PROGRAM_PREFIX + role


def module(role):
    return "dkvm.roles." + role.replace("-", "_")


def role_of(argv0):
    """(role name, module name) for a program name; anything unknown is the host CLI."""
    name = os.path.basename(argv0)
    role = name[len(PROGRAM_PREFIX):] if name.startswith(PROGRAM_PREFIX) else ""
    return (role, module(role)) if role in ROLES else CLI


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    role, module_name = role_of(argv[0])
    from dkvm import log
    log.set_role(role)
    # __import__, not importlib: importlib imports warnings, and the guest pays per module
    module = __import__(module_name, fromlist=["main"])
    from dkvm.errors import run_role
    run_role(module.main, argv)


if __name__ == "__main__":
    main()
