"""One file, several roles: the basename of argv[0] picks which one runs."""
import os
import sys

# program name -> (role name in log lines, module)
ROLES = {
    "dkvm-runtime": ("runtime", "dkvm.roles.runtime"),
    "dkvm-ctr-entrypoint": ("entrypoint", "dkvm.roles.ctr_entrypoint"),
    "dkvm-vm-init": ("vm-init", "dkvm.roles.vm_init"),
    "dkvm-exec": ("exec", "dkvm.roles.exec_relay"),
}
DEFAULT_ROLE = ("", "dkvm.roles.cli")


def role_of(argv0):
    """(role name, module name) for a program name; anything unknown is the host CLI."""
    return ROLES.get(os.path.basename(argv0), DEFAULT_ROLE)


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
