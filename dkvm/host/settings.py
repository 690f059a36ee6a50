"""Reading the DKVM_* options at create: each row of the options table (dkvm.options)
read by its kind, every value bounded first, and a container's value that weakens the
boundary refused unless the operator allows it. The host's alone: the guest reads the
values from the plan, the defaults from the table.

`parse_settings` is the one pure entry for the container's environment and the
operator's runtime arguments."""
from dkvm import kernel_args, paths
from dkvm.errors import DkvmError
from dkvm.options import BY_ENV, IMAGE_KERNEL, OPTIONS, PREFIX

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
# The longest value an option takes: far beyond any real one (a DKVM_DISKS list of a
# dozen disks), and short enough to quote in one line.
MAX_TEXT = 4096
# Digits a number may have: 2^64 has 20, and int() has a limit of its own (4300).
MAX_DIGITS = 20
WEEK = 7 * 24 * 3600
# A name (an unknown DKVM_* variable's) is quoted up to this many characters.
MAX_QUOTED_NAME = 64


def check_text(name, value, limit=MAX_TEXT):
    """Every option's value, before its kind reads it: bounded, and printable ASCII, so
    that what an error quotes is one line and what reaches QEMU or the guest kernel is
    plain text."""
    if len(value) > limit:
        raise DkvmError(f"{name}: a value of {len(value)} characters is too long: "
                        f"at most {limit} are accepted")
    for index, char in enumerate(value):
        if not (char.isascii() and char.isprintable()):
            raise DkvmError(f"{name}: the value has {char!r} at position {index}: "
                            "use printable ASCII only")


def quoted_name(name):
    """An environment variable's name as an error quotes it: one short line."""
    if len(name) <= MAX_QUOTED_NAME and name.isascii() and name.isprintable():
        return name
    return repr(name[:MAX_QUOTED_NAME]) + ("..." if len(name) > MAX_QUOTED_NAME else "")


def quoted(value):
    """A value as an error quotes it: repr, cut short (a value may be 4096 characters)."""
    return repr(value) if len(value) <= 80 else repr(value[:60]) + "..."


def whole_number(text):
    """The value of a decimal number that a kind has stripped, or None."""
    if not text.isascii() or not text.isdigit() or len(text) > MAX_DIGITS:
        return None
    return int(text)


# --- the kinds: how a value parses, what is accepted (the README's table), how a value
# reads back (the README's default) -----------------------------------------------------

class Bool:
    accepts = "`1`, `0`"
    TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no", "")

    def parse(self, name, value, context):
        word = value.strip().lower()
        if word in self.TRUE or word in self.FALSE:
            return word in self.TRUE
        raise DkvmError(f"{name}={quoted(value)} is not valid: use 1 or 0")

    def show(self, value):
        return "1" if value else "0"


class Size:
    """Bytes, written as `64m`, `512k`, `1g` (an optional trailing `b`), up to `limit`."""
    accepts = "size (`64m`, `1g`)"

    def __init__(self, limit=1 << 40):
        self.limit = limit

    def parse(self, name, value, context):
        text = value.strip().lower()
        if text.endswith("b"):
            text = text[:-1]
        digits, unit = (text[:-1], text[-1]) if text[-1:] in ("k", "m", "g") else (text, "")
        number = whole_number(digits)
        if not number:
            raise DkvmError(f"{name}={quoted(value)} is not valid: use a size such as 64m, "
                            "512m or 1g")
        if number * SIZE_UNITS[unit] > self.limit:
            raise DkvmError(f"{name}={quoted(value)} is too large: at most "
                            f"{self.show(self.limit)}")
        return number * SIZE_UNITS[unit]

    def show(self, value):
        for unit in "gmk":
            if value % SIZE_UNITS[unit] == 0:
                return f"{value // SIZE_UNITS[unit]}{unit}"
        return str(value)


class Seconds:
    """A whole number of seconds, `90` or `90s`, at most a week (a bound the timers
    that use it hold, far beyond any boot)."""
    accepts = "seconds (`90`, `300s`)"

    def parse(self, name, value, context):
        seconds = whole_number(value.strip().lower().removesuffix("s"))
        if not seconds:
            raise DkvmError(f"{name}={quoted(value)} is not valid: use a number of seconds "
                            "such as 90 or 300s")
        if seconds > WEEK:
            raise DkvmError(f"{name}={quoted(value)} is too long: at most {WEEK}s (a week)")
        return seconds

    def show(self, value):
        return f"{value}s"


class Choice:
    def __init__(self, *values):
        self.values = values
        self.accepts = ", ".join(f"`{v}`" for v in values)

    def parse(self, name, value, context):
        if value not in self.values:
            raise DkvmError(f"{name}={quoted(value)} is not valid: use one of "
                            f"{', '.join(self.values)}")
        return value

    def show(self, value):
        return value


class KernelAppend:
    """Arguments added to the guest kernel's command line; `-name` takes one of
    DKVM's own away (kernel_args.REMOVABLE)."""
    accepts = ("kernel parameters (`module.param=value`, the kernel's own such as "
               "`loglevel=4`); `-name` removes DKVM's argument `name`")
    max_length = kernel_args.MAX_APPEND

    def parse(self, name, value, context):
        unknown = kernel_args.unknown_removals(value)
        if unknown:
            raise DkvmError(f"{name}: -{unknown[0]} removes none of DKVM's kernel arguments; "
                            f"removable: {' '.join(kernel_args.REMOVABLE)}")
        added, _ = kernel_args.split_user_append(value)
        for word in added:
            why = kernel_args.refusal(word)
            if why:
                raise DkvmError(f"{name}: {word} is not accepted: {why}; use kernel parameters "
                                "(module.param=value, or the kernel's own such as loglevel=4, "
                                "mitigations=off)")
        return " ".join(value.split())

    def show(self, value):
        return value or "empty"


class KernelName:
    """`<name>` or `<name>/<release>`: one of the kernels this build carries (the
    context's `kernels`, name -> boot descriptor), or the image's own (`image`, checked
    against the image's tree at create)."""
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
        raise DkvmError(f"{name}={quoted(value)}: no such kernel; available: {known}, or "
                        f"{IMAGE_KERNEL} (the image's own)")

    def show(self, value):
        return value


DISK_FILESYSTEMS = ("ext4", "ext3", "ext2")
MIN_DISK = 16 << 20
# A disk is a sparse file in the container's tree, on the host's filesystem: ext4 with
# 4 KiB blocks holds a file of at most 2^32 - 1 blocks (16 TiB less 4 KiB; `truncate`
# beyond fails with EFBIG), and mke2fs makes ext2, ext3 and ext4 of that size.
MAX_DISK = ((1 << 32) - 1) * 4096


class Disks:
    """`<file>,<mount point>,<filesystem>,<size>`, `;` between disks: a file in the
    container (made sparse and formatted on first use) that the guest mounts. Read
    once, into the plan's records (schema.Disk, each given its serial at create)."""
    accepts = "`<file>,<mount point>,<ext4/ext3/ext2>,<size>`, `;` between disks"

    def parse(self, name, value, context):
        return disk_records(value, name)

    def show(self, value):
        return ";".join(f"{disk.file},{disk.mount_point},{disk.filesystem},"
                        f"{Size().show(disk.size)}" for disk in value) or "empty"


def disk_records(text, name):
    """[schema.Disk] from DKVM_DISKS' text (schema is imported here, not above: the
    runtime reads the --dkvm-* flags' names on every docker operation)."""
    from dkvm.schema import Disk
    disks, mount_points = [], set()
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        fields = [field.strip() for field in entry.split(",")]
        if len(fields) != 4:
            raise DkvmError(f"{name}={quoted(entry)} is not valid: use <file>,<mount point>,"
                            "<filesystem>,<size>, e.g. /disks/docker.img,/var/lib/docker,ext4,10g")
        file, mount, fs, size = fields
        for what, path in (("file", file), ("mount point", mount)):
            if not path.startswith("/") or path.rstrip("/") == "" or "/../" in path + "/":
                raise DkvmError(f"{name}: the {what} {quoted(path)} must be an absolute path "
                                "below /, without ..")
        if fs not in DISK_FILESYSTEMS:
            raise DkvmError(f"{name}: filesystem {quoted(fs)} is not supported: use "
                            f"{', '.join(DISK_FILESYSTEMS)}")
        size = Size(limit=MAX_DISK).parse(f"{name} size", size, None)
        if size < MIN_DISK:
            raise DkvmError(f"{name}: a disk of {size} bytes is too small: use at least 16m")
        mount = mount.rstrip("/")
        if mount in mount_points:
            raise DkvmError(f"{name}: two disks at {mount}")
        mount_points.add(mount)
        disks.append(Disk(file=file, mount_point=mount, filesystem=fs, size=size))
    return disks


# Each row's `kind` names one of these; a new kind is a class above and a name here.
KINDS = {
    "bool": Bool(),
    "size": Size(),
    "seconds": Seconds(),
    "accel": Choice("auto", "kvm", "tcg"),
    "kernel": KernelName(),
    "kernel_append": KernelAppend(),
    "disks": Disks(),
}


def kind_of(option):
    return KINDS[option.kind]


# --- the operator's runtime arguments and permissions ---------------------------------

BY_RUNTIME_ARG = {option.runtime_arg: option for option in OPTIONS}
# What the operator may allow containers to set (host.policy, --dkvm-allow)
PERMISSIONS = tuple(option.operator_only.permission for option in OPTIONS
                    if option.operator_only)
ALLOW_ARG = "--dkvm-allow"


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


def parse_value(option, name, value, context):
    """An option's value from its text, `name` (the variable or the runtime argument)
    naming it in the one line of an error."""
    kind = kind_of(option)
    check_text(name, value, getattr(kind, "max_length", MAX_TEXT))
    return kind.parse(name, value, context)


def parse_permissions(name, text):
    """The permissions a comma-separated list (`--dkvm-allow`) names."""
    check_text(name, text)
    names = [word.strip() for word in text.split(",") if word.strip()]
    for word in names:
        if word not in PERMISSIONS:
            raise DkvmError(f"{name}: {word} is not a permission: use {', '.join(PERMISSIONS)}")
    return set(names)


def copy_default(default):
    """A default of its own for each container (a list is shared by every row's reader)."""
    return list(default) if isinstance(default, list) else default


def parse_settings(settings, context, runtime_args=None, policy_allows=()):
    """{attr: value} for every option: the container's DKVM_* `settings` over the
    operator's (`runtime_args`: {--dkvm-<option>: text}, and --dkvm-allow) over each
    option's default. A container's value that weakens the boundary needs the
    operator's permission: in `policy_allows` (the host's policy file) or
    --dkvm-allow. Raises DkvmError naming the first bad one."""
    values = {option.attr: copy_default(option.default) for option in OPTIONS}
    allowed = set(policy_allows)
    for arg, text in (runtime_args or {}).items():
        if arg == ALLOW_ARG:
            allowed |= parse_permissions(arg, text)
        else:
            option = BY_RUNTIME_ARG.get(arg)
            if option is None:
                raise DkvmError(f"unknown runtime argument {arg}")
            values[option.attr] = parse_value(option, arg, text, context)
    for name, value in settings.items():
        option = BY_ENV.get(name)
        if option is None:
            raise DkvmError(f"unknown option {quoted_name(name)}: DKVM accepts "
                            f"{', '.join(sorted(BY_ENV))}")
        values[option.attr] = parse_value(option, name, value, context)
        rule = option.operator_only
        if rule and rule.applies(values[option.attr]) and rule.permission not in allowed:
            shown = value if len(value) <= 60 else value[:60] + "..."
            raise DkvmError(f"{name}={shown} is the operator's to set, not the container's: "
                            f"allow {rule.permission} in {paths.POLICY_FILE} "
                            f"(\"container_may_set\") or with the runtime argument "
                            f"{ALLOW_ARG}={rule.permission}")
    return values
