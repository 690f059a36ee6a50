"""DKVM_* options and runtime arguments: bad values fail `create` with a message that
names the option and says what it accepts; the option table is the one source of
names, defaults and the README's option table."""
import re

import pytest

from unitutil import REPO, facts, load_config, rewrite, with_env
from dkvm.errors import DkvmError
from dkvm.host.settings import Bool, Size, kind_of, parse_settings, split_env
from dkvm.options import BY_ENV, OPTIONS
from dkvm.schema import Options, Plan


def create_error(*env, config="plain", **kw):
    with pytest.raises(DkvmError) as info:
        rewrite(with_env(load_config(config), *env), **kw)
    return info.value.message


def test_bad_accel():
    msg = create_error("DKVM_ACCEL=foo")
    assert "DKVM_ACCEL" in msg and "'foo'" in msg
    for accepted in ("auto", "kvm", "tcg"):
        assert accepted in msg


def test_unknown_option():
    msg = create_error("DKVM_FOO=1")
    assert "DKVM_FOO" in msg
    for accepted in ("DKVM_ACCEL", "DKVM_KERNEL", "DKVM_KERNEL_APPEND", "DKVM_KERNEL_DEBUG",
                     "DKVM_SYS_ADMIN", "DKVM_DEV_SHM_SIZE", "DKVM_KERNEL_MOUNT_LIB_MODULES"):
        assert accepted in msg


@pytest.mark.parametrize("value", ["nope", "debian/5.10.0-1-amd64", "/6.1.0-28-amd64"])
def test_unknown_kernel(value):
    msg = create_error(f"DKVM_KERNEL={value}")
    assert "DKVM_KERNEL" in msg and repr(value) in msg
    assert "debian" in msg and "debian/6.1.0-28-amd64" in msg


def test_bad_kernel_mount_lib_modules():
    msg = create_error("DKVM_KERNEL_MOUNT_LIB_MODULES=all")
    assert "DKVM_KERNEL_MOUNT_LIB_MODULES='all' is not valid: use 1 or 0" in msg


def test_bad_kernel_debug():
    msg = create_error("DKVM_KERNEL_DEBUG=maybe")
    assert "DKVM_KERNEL_DEBUG" in msg and "'maybe'" in msg
    assert "1 or 0" in msg


@pytest.mark.parametrize("value", ["lots", "0", "-5m", "12t", "1.5g"])
def test_bad_dev_shm_size(value):
    msg = create_error(f"DKVM_DEV_SHM_SIZE={value}")
    assert "DKVM_DEV_SHM_SIZE" in msg and repr(value) in msg
    assert "64m" in msg


@pytest.mark.parametrize("value", ["soon", "0", "-5", "1.5", "5m", "9" * 400])
def test_bad_boot_timeout(value):
    msg = create_error(f"DKVM_BOOT_TIMEOUT={value}")
    assert f"DKVM_BOOT_TIMEOUT={value[:60]!r}" in msg and "is not valid: use a number of " \
        "seconds" in msg


@pytest.mark.parametrize("value,seconds", [("90", 90), ("300s", 300), (" 5S ", 5)])
def test_boot_timeout(value, seconds):
    _, plan = rewrite(with_env(load_config("plain"), f"DKVM_BOOT_TIMEOUT={value}"))
    assert plan.options.boot_timeout == seconds


def test_kvm_required_but_unusable():
    msg = create_error("DKVM_ACCEL=kvm", kvm_usable=False)
    assert "DKVM_ACCEL=kvm" in msg and "tcg" in msg
    # fine where KVM works
    _, plan = rewrite(with_env(load_config("plain"), "DKVM_ACCEL=kvm"), kvm_usable=True)
    assert plan.options.accel == "kvm"


def test_errors_exit_with_one():
    with pytest.raises(DkvmError) as info:
        rewrite(with_env(load_config("plain"), "DKVM_ACCEL=foo"))
    assert info.value.exit_code == 1
    assert str(info.value) == info.value.message


# --- runtime defaults vs container env ---------------------------------------------

def test_runtime_default_accel_applies():
    _, plan = rewrite(load_config("plain"), kvm_usable=True, defaults={"--dkvm-accel": "tcg"})
    assert plan.options.accel == "tcg"


def test_container_env_overrides_runtime_default():
    config = with_env(load_config("plain"), "DKVM_ACCEL=kvm")
    _, plan = rewrite(config, kvm_usable=True, defaults={"--dkvm-accel": "tcg"})
    assert plan.options.accel == "kvm"
    config = with_env(load_config("plain"), "DKVM_ACCEL=auto")
    _, plan = rewrite(config, kvm_usable=False, defaults={"--dkvm-accel": "kvm"})
    assert plan.options.accel == "tcg"


def test_parse_settings_defaults_not_shared():
    defaults = {"--dkvm-accel": "tcg"}
    values = parse_settings({"DKVM_ACCEL": "kvm"}, facts(), defaults)
    assert values["accel"] == "kvm" and defaults == {"--dkvm-accel": "tcg"}
    assert parse_settings({}, facts(), defaults)["accel"] == "tcg"
    values = parse_settings({}, facts())
    assert Options(**{name: values[name] for name in Options.FIELDS}) == Options()
    assert values["disks"] == [] and values["disks"] is not BY_ENV["DKVM_DISKS"].default


def test_a_bad_runtime_argument_fails_create_naming_the_argument():
    for arg, value in (("--dkvm-accel", "fast"), ("--dkvm-boot-timeout", "9" * 400),
                       ("--dkvm-kernel", "nope"), ("--dkvm-kernel-append", "init=/x"),
                       ("--dkvm-allow", "DKVM_EVERYTHING")):
        msg = create_error(defaults={arg: value})
        assert msg.startswith(arg) and "\n" not in msg, msg


def test_every_option_is_a_field_of_the_plan_with_its_default():
    """One row makes the option: its plan field and default come from the table."""
    in_options = [option for option in OPTIONS if not option.plan_field]
    assert list(Options.FIELDS) == [option.attr for option in in_options]
    assert Options().as_dict() == {option.attr: option.default for option in in_options}
    plan = Plan().as_dict()
    assert {option.attr: option.default for option in OPTIONS if option.plan_field} == \
        {option.attr: plan[option.attr] for option in OPTIONS if option.plan_field}
    for option in OPTIONS:
        assert option.env.startswith("DKVM_") and BY_ENV[option.env] is option
        kind = kind_of(option)
        # what the README shows as the default parses back to it ("empty" text aside)
        if kind.show(option.default) != "empty":
            assert kind.parse(option.env, kind.show(option.default), facts()) == option.default


def readme_options():
    """The README's option table: {option: (values, default)}."""
    text = (REPO / "README.md").read_text()
    rows = {}
    for line in text.split("## Options", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(DKVM_\w+)`", cells[0]) if len(cells) == 4 else None
        if match:
            rows[match.group(1)] = (cells[1], cells[2].strip("`"))
    return rows


def test_readme_option_table_matches_the_option_table():
    assert readme_options() == {option.env: (kind_of(option).accepts,
                                             kind_of(option).show(option.default))
                                for option in OPTIONS}


# --- value parsers -----------------------------------------------------------------

@pytest.mark.parametrize("value,size", [("64m", 64 << 20), ("1g", 1 << 30), ("512M", 512 << 20),
                                        ("4096", 4096), ("8k", 8 << 10), ("2gb", 2 << 30),
                                        (" 16m ", 16 << 20)])
def test_parse_size(value, size):
    assert Size().parse("X", value, None) == size


@pytest.mark.parametrize("size,text", [(64 << 20, "64m"), (1 << 30, "1g"), (8 << 10, "8k"),
                                       (1000, "1000")])
def test_show_size(size, text):
    assert Size().show(size) == text


@pytest.mark.parametrize("value,flag", [("1", True), ("true", True), ("YES", True),
                                        ("0", False), ("false", False), ("no", False),
                                        ("", False)])
def test_parse_bool(value, flag):
    assert Bool().parse("X", value, None) is flag


def test_split_env():
    workload, settings = split_env(["A=1", "DKVM_ACCEL=tcg", "B=x=y", "DKVM_KERNEL_APPEND=a=b",
                                    "NOVALUE"])
    assert workload == ["A=1", "B=x=y", "NOVALUE"]
    assert settings == {"DKVM_ACCEL": "tcg", "DKVM_KERNEL_APPEND": "a=b"}


# --- DKVM_KERNEL_APPEND: kernel parameters only --------------------------------------

def append(value):
    """DKVM_KERNEL_APPEND as create reads it, from where the operator allows it."""
    return parse_settings({"DKVM_KERNEL_APPEND": value}, facts(),
                          policy_allows={"DKVM_KERNEL_APPEND"})["kernel_append"]


@pytest.mark.parametrize("value", [
    "loglevel=4", "quiet", "mitigations=off nokaslr", "ipv6.disable=1", "dkvm.test=42 -tsc",
    "init_on_free=1", "transparent-hugepage=never", "printk.time=1 nmi_watchdog=0",
    "  panic=10\t".strip(), "-tsc -no_timer_check", "module_blacklist=floppy", "debug"])
def test_kernel_parameters_are_accepted(value):
    assert append(value) == " ".join(value.split())


@pytest.mark.parametrize("value,word,why", [
    ("init=/rootfs/pwn", "init=/rootfs/pwn", "it chooses how the guest boots, which is DKVM's"),
    ("rdinit=/x", "rdinit=/x", "it chooses how the guest boots, which is DKVM's"),
    ("root=/dev/vda rw", "root=/dev/vda", "it chooses how the guest boots, which is DKVM's"),
    ("quiet ro", "ro", "it chooses how the guest boots, which is DKVM's"),
    ("console=tty0", "console=tty0", "it chooses how the guest boots, which is DKVM's"),
    ("LD_PRELOAD=/rootfs/x.so", "LD_PRELOAD=/rootfs/x.so", "the kernel would hand it to init"),
    ("foo=1", "foo=1", "the kernel would hand it to init"),
    ("single", "single", "the kernel would hand it to init"),
    ("loglevel=4 -- /bin/sh", "--", "the kernel hands what follows it to init"),
    ("=1", "=1", "the kernel would hand it to init"),
    ("-", "-", "the kernel would hand it to init"),
    ('dyndbg="file x +p"', 'dyndbg="file', "the kernel reads quotes itself"),
    ("a..b=1", "a..b=1", "it is not a kernel parameter"),
    (".x=1", ".x=1", "it is not a kernel parameter"),
    ("a/b.c=1", "a/b.c=1", "it is not a kernel parameter"),
    ("sysctl.kernel.core_pattern=|/rootfs/x", "sysctl.kernel.core_pattern=|/rootfs/x",
     "the guest's sysctls at boot can name programs the kernel runs as root"),
])
def test_what_the_kernel_hands_to_init_is_refused(value, word, why):
    with pytest.raises(DkvmError) as info:
        append(value)
    assert info.value.message == (
        f"DKVM_KERNEL_APPEND: {word} is not accepted: {why}; use kernel parameters "
        "(module.param=value, or the kernel's own such as loglevel=4, mitigations=off)")
