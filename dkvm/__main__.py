"""One file, several roles: the basename of argv[0] picks which one runs."""
import importlib
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
    module = importlib.import_module(role_module(argv[0]))
    from dkvm.errors import run_role
    run_role(module.main, argv)


if __name__ == "__main__":
    main()
