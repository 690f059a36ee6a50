"""One file, several roles: the basename of argv[0] picks which one runs."""
import os
import sys

ROLES = {
    "dkvm-runtime": "dkvm.roles.runtime",
    "dkvm-ctr-entrypoint": "dkvm.roles.ctr_entrypoint",
    "dkvm-vm-init": "dkvm.roles.vm_init",
    "dkvm-exec": "dkvm.roles.exec_relay",
}
DEFAULT_ROLE = "dkvm.roles.cli"


def role_module(argv0):
    """The module name for a program name; anything unknown is the host CLI."""
    return ROLES.get(os.path.basename(argv0), DEFAULT_ROLE)


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    # __import__, not importlib: importlib imports warnings, and the guest pays per module
    module = __import__(role_module(argv[0]), fromlist=["main"])
    from dkvm.errors import run_role
    run_role(module.main, argv)


if __name__ == "__main__":
    main()
