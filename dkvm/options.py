"""DKVM_* options: parsed and validated once, at `create`, so a bad value fails
`docker run` at once with a message naming the option and what it accepts."""
import re
from dataclasses import dataclass

from dkvm.errors import DkvmError

ACCELS = ("auto", "kvm", "tcg")
BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}
_SIZE = re.compile(r"^(\d+)([kmg]?)b?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass
class Options:
    accel: str = "auto"
    kernel: str = "debian"
    kernel_append: str = ""
    kernel_debug: bool = False
    kernel_lib_modules: bool = False
    sys_admin: bool = False
    dev_shm_size: int = 64 << 20
    # options from the runtime's own arguments (daemon.json runtimeArgs)
    runc: str = ""


def parse_bool(name, value):
    try:
        return BOOLS[value.strip().lower()]
    except KeyError:
        raise DkvmError(f"{name}={value!r} is not valid: use 1 or 0") from None


def parse_size(name, value):
    m = _SIZE.match(value.strip())
    if not m or int(m.group(1)) == 0:
        raise DkvmError(f"{name}={value!r} is not valid: use a size such as 64m, 512m or 1g")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_accel(name, value):
    if value not in ACCELS:
        raise DkvmError(f"{name}={value!r} is not valid: use one of {', '.join(ACCELS)}")
    return value


def parse_kernel(name, value, kernels):
    """`dist` or `dist/release`, one of the kernels this build carries."""
    dist, _, release = value.partition("/")
    if dist in kernels and (not release or release == kernels[dist]):
        return dist
    known = ", ".join(f"{d} or {d}/{r}" for d, r in sorted(kernels.items()))
    raise DkvmError(f"{name}={value!r}: no such kernel; available: {known}")


CONTAINER_OPTIONS = {
    "DKVM_ACCEL": ("accel", lambda n, v, k: parse_accel(n, v)),
    "DKVM_KERNEL": ("kernel", parse_kernel),
    "DKVM_KERNEL_APPEND": ("kernel_append", lambda n, v, k: v),
    "DKVM_KERNEL_DEBUG": ("kernel_debug", lambda n, v, k: parse_bool(n, v)),
    "DKVM_KERNEL_MOUNT_LIB_MODULES": ("kernel_lib_modules", lambda n, v, k: parse_bool(n, v)),
    "DKVM_SYS_ADMIN": ("sys_admin", lambda n, v, k: parse_bool(n, v)),
    "DKVM_DEV_SHM_SIZE": ("dev_shm_size", lambda n, v, k: parse_size(n, v)),
}
RUNTIME_ARGS = {"--dkvm-runc": "runc", "--dkvm-accel": "accel"}


def split_env(env):
    """Split a container's env list into (workload env, DKVM_* settings)."""
    workload, settings = [], {}
    for item in env:
        name, _, value = item.partition("=")
        if name.startswith("DKVM_"):
            settings[name] = value
        else:
            workload.append(item)
    return workload, settings


def parse_options(settings, kernels, defaults=None):
    """Options from DKVM_* settings over the runtime's defaults; raises on bad input."""
    opts = Options(**(defaults or {}))
    for name, value in settings.items():
        if name not in CONTAINER_OPTIONS:
            accepted = ", ".join(sorted(CONTAINER_OPTIONS))
            raise DkvmError(f"unknown option {name}: DKVM accepts {accepted}")
        attr, parse = CONTAINER_OPTIONS[name]
        setattr(opts, attr, parse(name, value, kernels))
    return opts


def split_runtime_args(argv):
    """Remove DKVM's own global flags (from daemon.json runtimeArgs) from a runtime
    command line; returns (argv for runc, dict of DKVM defaults)."""
    rest, found = [], {}
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in RUNTIME_ARGS:
            if not eq:
                value = next(args, "")
            if name == "--dkvm-accel":
                parse_accel(name, value)
            found[RUNTIME_ARGS[name]] = value
        elif name.startswith("--dkvm-"):
            raise DkvmError(f"unknown runtime argument {name}: DKVM accepts "
                            + ", ".join(sorted(RUNTIME_ARGS)))
        else:
            rest.append(arg)
    return rest, found
