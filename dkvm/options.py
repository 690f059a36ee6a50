"""The DKVM_* options: one table, one row per option.

Each row names the environment variable, the plan field it sets (`plan.options.<attr>`),
its kind (how a value is parsed, what is accepted, how the default reads) and its
default. Validation at create, the plan's `Options` record and the README's option
table (checked by a unit test) all come from here, so a new option is one row plus
the code that uses it.

Shared by every side (the guest reads the defaults through the plan), so it imports
only other shared modules of plain string work, no `re`.
"""
from dkvm import kernel_args
from dkvm.errors import DkvmError

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class Bool:
    type = bool
    accepts = "`1`, `0`"
    TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no", "")

    def parse(self, name, value, context):
        word = value.strip().lower()
        if word in self.TRUE or word in self.FALSE:
            return word in self.TRUE
        raise DkvmError(f"{name}={value!r} is not valid: use 1 or 0")

    def show(self, value):
        return "1" if value else "0"


class Size:
    """Bytes, written as `64m`, `512k`, `1g` (an optional trailing `b`)."""
    type = int
    accepts = "size (`64m`, `1g`)"

    def parse(self, name, value, context):
        text = value.strip().lower()
        if text.endswith("b"):
            text = text[:-1]
        digits, unit = (text[:-1], text[-1]) if text[-1:] in "kmg" else (text, "")
        if not digits.isdigit() or not digits.isascii() or int(digits) == 0:
            raise DkvmError(f"{name}={value!r} is not valid: use a size such as 64m, 512m or 1g")
        return int(digits) * SIZE_UNITS[unit]

    def show(self, value):
        for unit in "gmk":
            if value % SIZE_UNITS[unit] == 0:
                return f"{value // SIZE_UNITS[unit]}{unit}"
        return str(value)


class Seconds:
    """A whole number of seconds, `90` or `90s`."""
    type = int
    accepts = "seconds (`90`, `300s`)"

    def parse(self, name, value, context):
        text = value.strip().lower().removesuffix("s")
        if not text.isdigit() or not text.isascii() or int(text) == 0:
            raise DkvmError(f"{name}={value!r} is not valid: use a number of seconds such as "
                            "90 or 300s")
        return int(text)

    def show(self, value):
        return f"{value}s"


class Choice:
    type = str

    def __init__(self, *values):
        self.values = values
        self.accepts = ", ".join(f"`{v}`" for v in values)

    def parse(self, name, value, context):
        if value not in self.values:
            raise DkvmError(f"{name}={value!r} is not valid: use one of {', '.join(self.values)}")
        return value

    def show(self, value):
        return value


class Text:
    type = str
    accepts = "text"

    def parse(self, name, value, context):
        return value

    def show(self, value):
        return value or "empty"


class KernelAppend(Text):
    """Arguments added to the guest kernel's command line; `-name` takes one of
    DKVM's own away (kernel_args.REMOVABLE)."""
    accepts = "kernel arguments; `-name` removes DKVM's argument `name`"

    def parse(self, name, value, context):
        unknown = kernel_args.unknown_removals(value)
        if unknown:
            raise DkvmError(f"{name}: -{unknown[0]} removes none of DKVM's kernel arguments; "
                            f"removable: {' '.join(kernel_args.REMOVABLE)}")
        return value


IMAGE_KERNEL = "image"          # DKVM_KERNEL=image: the kernel the image carries


class KernelName:
    """`<name>` or `<name>/<release>`: one of the kernels this build carries (the
    context's `kernels`, name -> boot descriptor), or the image's own (`image`, checked
    against the image's tree at create)."""
    type = str
    accepts = ("`<name>` or `<name>/<release>` (`dkvm kernels` lists them), `image` or "
               "`image/<release>` (the image's own)")

    def parse(self, name, value, context):
        kernels = context.kernels
        dist, _, release = value.partition("/")
        if dist == IMAGE_KERNEL:
            return value.rstrip("/")
        if dist in kernels and (not release or release == kernels[dist].release):
            return dist
        known = ", ".join(f"{d} or {d}/{boot.release}" for d, boot in sorted(kernels.items()))
        raise DkvmError(f"{name}={value!r}: no such kernel; available: {known}, or "
                        f"{IMAGE_KERNEL} (the image's own)")

    def show(self, value):
        return value


DISK_FILESYSTEMS = ("ext4", "ext3", "ext2")
MIN_DISK = 16 << 20


class Disks:
    """`<file>,<mount point>,<filesystem>,<size>`, `;` between disks: a file in the
    container (made sparse and formatted on first use) that the guest mounts."""
    type = str
    accepts = "`<file>,<mount point>,<ext4/ext3/ext2>,<size>`, `;` between disks"

    def parse(self, name, value, context):
        disks = disk_entries(value, name)
        return ";".join(",".join([file, mount, fs, str(size)])
                        for file, mount, fs, size in disks)

    def show(self, value):
        return value or "empty"


def disk_entries(text, name="DKVM_DISKS"):
    """[(file, mount point, filesystem, size in bytes)] from DKVM_DISKS' text."""
    disks, mount_points = [], set()
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        fields = [field.strip() for field in entry.split(",")]
        if len(fields) != 4:
            raise DkvmError(f"{name}={entry!r} is not valid: use <file>,<mount point>,"
                            "<filesystem>,<size>, e.g. /disks/docker.img,/var/lib/docker,ext4,10g")
        file, mount, fs, size = fields
        for what, path in (("file", file), ("mount point", mount)):
            if not path.startswith("/") or path.rstrip("/") == "" or "/../" in path + "/":
                raise DkvmError(f"{name}: the {what} {path!r} must be an absolute path "
                                "below /, without ..")
        if fs not in DISK_FILESYSTEMS:
            raise DkvmError(f"{name}: filesystem {fs!r} is not supported: use "
                            f"{', '.join(DISK_FILESYSTEMS)}")
        size = Size().parse(f"{name} size", size, None)
        if size < MIN_DISK:
            raise DkvmError(f"{name}: a disk of {size} bytes is too small: use at least 16m")
        mount = mount.rstrip("/")
        if mount in mount_points:
            raise DkvmError(f"{name}: two disks at {mount}")
        mount_points.add(mount)
        disks.append((file, mount, fs, size))
    return disks


class Option:
    __slots__ = ("env", "attr", "kind", "default", "runtime_arg")

    def __init__(self, env, attr, kind, default, runtime_arg=None):
        self.env, self.attr, self.kind, self.default = env, attr, kind, default
        self.runtime_arg = runtime_arg      # also settable host-wide, in daemon.json


OPTIONS = [
    Option("DKVM_ACCEL", "accel", Choice("auto", "kvm", "tcg"), "auto",
           runtime_arg="--dkvm-accel"),
    Option("DKVM_KERNEL", "kernel", KernelName(), "dkvm"),
    Option("DKVM_KERNEL_APPEND", "kernel_append", KernelAppend(), ""),
    Option("DKVM_KERNEL_DEBUG", "kernel_debug", Bool(), False),
    Option("DKVM_KERNEL_MOUNT_LIB_MODULES", "kernel_lib_modules", Bool(), False),
    Option("DKVM_DEV_SHM_SIZE", "dev_shm_size", Size(), 64 << 20),
    Option("DKVM_SYS_ADMIN", "sys_admin", Bool(), False),
    Option("DKVM_BOOT_TIMEOUT", "boot_timeout", Seconds(), 180),
    Option("DKVM_WATCHDOG", "watchdog", Seconds(), 120),
    Option("DKVM_DISKS", "disk_list", Disks(), ""),
]
BY_ENV = {option.env: option for option in OPTIONS}
PREFIX = "DKVM_"


def split_env(env):
    """Split a process's env list into (the workload's env, {DKVM_* name: value})."""
    workload, settings = [], {}
    for item in env:
        name, _, value = item.partition("=")
        if name.startswith(PREFIX):
            settings[name] = value
        else:
            workload.append(item)
    return workload, settings


def parse_settings(settings, context, defaults=None):
    """{attr: value} for every option: the DKVM_* settings over `defaults` (the
    runtime's own arguments) over each option's default. Raises DkvmError naming the
    first bad one."""
    values = {option.attr: option.default for option in OPTIONS}
    values.update(defaults or {})
    for name, value in settings.items():
        option = BY_ENV.get(name)
        if option is None:
            raise DkvmError(f"unknown option {name}: DKVM accepts {', '.join(sorted(BY_ENV))}")
        values[option.attr] = option.kind.parse(name, value, context)
    return values
