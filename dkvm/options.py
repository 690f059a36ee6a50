"""The DKVM_* options: one table, one row per option.

Each row names the environment variable, the plan field it sets (`plan.options.<attr>`),
its kind (the name of how the host reads a value: host.settings.KINDS), its default
and which of its values weaken the boundary. Validation at create (host.settings),
the plan's `Options` record (schema: each field of its default's type) and the
README's option table (checked by a unit test) all come from here, so a new option
is one row plus the code that uses it.

Shared by every side (the guest reads the defaults through the plan), so it is data
only: no imports. Reading a value (parsing, bounds, permissions) is the host's.
"""

IMAGE_KERNEL = "image"          # DKVM_KERNEL=image: the kernel the image carries
PREFIX = "DKVM_"
RUNTIME_ARG_PREFIX = "--dkvm-"


def is_image_kernel(kernel):
    return kernel.partition("/")[0] == IMAGE_KERNEL


class OperatorOnly:
    """The values of an option that weaken the boundary: the operator's to set (the
    runtime's arguments), a container's only where the operator allows `permission`
    (host.policy). The image's ENV is a container's environment too."""
    __slots__ = ("permission", "applies")

    def __init__(self, permission, applies):
        self.permission, self.applies = permission, applies     # applies(parsed value)


class Option:
    """`attr` names the option's field in the plan's Options record (`plan.options.<attr>`),
    or with `plan_field` the plan's own field (`plan.<attr>`): DKVM_DISKS' records are
    the plan's disks, in one place. `kind` names how the host reads a value
    (host.settings.KINDS); the value is of its default's type."""
    __slots__ = ("env", "attr", "kind", "default", "operator_only", "runtime_arg", "plan_field")

    def __init__(self, env, attr, kind, default, operator_only=None, plan_field=False):
        self.env, self.attr, self.kind, self.default = env, attr, kind, default
        self.operator_only, self.plan_field = operator_only, plan_field
        # each is also the operator's, host-wide: a runtime argument in daemon.json
        self.runtime_arg = RUNTIME_ARG_PREFIX + env[len(PREFIX):].lower().replace("_", "-")


OPTIONS = [
    Option("DKVM_ACCEL", "accel", "accel", "auto"),
    Option("DKVM_KERNEL", "kernel", "kernel", "dkvm",
           OperatorOnly("DKVM_KERNEL=image", is_image_kernel)),
    Option("DKVM_KERNEL_APPEND", "kernel_append", "kernel_append", "",
           OperatorOnly("DKVM_KERNEL_APPEND", bool)),
    Option("DKVM_KERNEL_DEBUG", "kernel_debug", "bool", False),
    Option("DKVM_KERNEL_MOUNT_LIB_MODULES", "kernel_lib_modules", "bool", False),
    Option("DKVM_DEV_SHM_SIZE", "dev_shm_size", "size", 64 << 20),
    Option("DKVM_SYS_ADMIN", "sys_admin", "bool", False, OperatorOnly("DKVM_SYS_ADMIN", bool)),
    Option("DKVM_BOOT_TIMEOUT", "boot_timeout", "seconds", 180),
    Option("DKVM_WATCHDOG", "watchdog", "seconds", 120),
    Option("DKVM_DISKS", "disks", "disks", [], plan_field=True),
    Option("DKVM_TEMPLATE", "template", "bool", True),
]
BY_ENV = {option.env: option for option in OPTIONS}
