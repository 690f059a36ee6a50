"""DKVM_* options and runtime arguments: bad values fail `create` with a message that
names the option and says what it accepts; the option table is the one source of
names, defaults and the README's option table."""
import re

import pytest

from unitutil import REPO, facts, load_config, rewrite, with_env
from dkvm.errors import DkvmError
from dkvm.host.rewrite import MIB, MIN_GUEST_MIB
from dkvm.host.runc_cli import split_runtime_args
from dkvm.options import BY_ENV, OPTIONS, Bool, Size, parse_settings, split_env
from dkvm.schema import Options


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


@pytest.mark.parametrize("value", ["soon", "0", "-5", "1.5", "5m", "١٢"])
def test_bad_boot_timeout(value):
    msg = create_error(f"DKVM_BOOT_TIMEOUT={value}")
    assert f"DKVM_BOOT_TIMEOUT={value!r} is not valid: use a number of seconds" in msg


@pytest.mark.parametrize("value,seconds", [("90", 90), ("300s", 300), (" 5S ", 5)])
def test_boot_timeout(value, seconds):
    _, plan = rewrite(with_env(load_config("plain"), f"DKVM_BOOT_TIMEOUT={value}"))
    assert plan.options.boot_timeout == seconds


def test_memory_below_minimum():
    config = load_config("resources-tmpfs-volume")
    config["linux"]["resources"]["memory"]["limit"] = 239 * MIB
    with pytest.raises(DkvmError) as info:
        rewrite(config)
    msg = info.value.message
    assert "--memory" in msg and "239MiB" in msg and "at least 240m" in msg
    assert f"the guest needs {MIN_GUEST_MIB}MiB" in msg


def test_memory_at_minimum_boots():
    config = load_config("resources-tmpfs-volume")
    config["linux"]["resources"]["memory"]["limit"] = 240 * MIB
    _, plan = rewrite(config)
    assert plan.memory_mib == MIN_GUEST_MIB
    # under KVM there is no translation cache to hold
    config["linux"]["resources"]["memory"]["limit"] = 208 * MIB
    _, plan = rewrite(config, kvm_usable=True)
    assert plan.memory_mib == MIN_GUEST_MIB


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
    _, plan = rewrite(load_config("plain"), kvm_usable=True, defaults={"accel": "tcg"})
    assert plan.options.accel == "tcg"


def test_container_env_overrides_runtime_default():
    config = with_env(load_config("plain"), "DKVM_ACCEL=kvm")
    _, plan = rewrite(config, kvm_usable=True, defaults={"accel": "tcg"})
    assert plan.options.accel == "kvm"
    config = with_env(load_config("plain"), "DKVM_ACCEL=auto")
    _, plan = rewrite(config, kvm_usable=False, defaults={"accel": "kvm"})
    assert plan.options.accel == "tcg"


def test_parse_settings_defaults_not_shared():
    defaults = {"accel": "tcg"}
    values = parse_settings({"DKVM_ACCEL": "kvm"}, facts(), defaults)
    assert values["accel"] == "kvm" and defaults == {"accel": "tcg"}
    assert parse_settings({}, facts(), defaults)["accel"] == "tcg"
    assert Options(**parse_settings({}, facts())) == Options()


def test_every_option_is_a_field_of_the_plan_with_its_default():
    """One row makes the option: its plan field and default come from the table."""
    assert list(Options.FIELDS) == [option.attr for option in OPTIONS]
    assert Options().as_dict() == {option.attr: option.default for option in OPTIONS}
    for option in OPTIONS:
        assert option.env.startswith("DKVM_") and BY_ENV[option.env] is option
        assert isinstance(option.default, option.kind.type)
        # what the README shows as the default parses back to it ("empty" text aside)
        if option.kind.show(option.default) != "empty":
            assert option.kind.parse(option.env, option.kind.show(option.default),
                                     facts()) == option.default


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
    assert readme_options() == {option.env: (option.kind.accepts, option.kind.show(option.default))
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


# --- runtime arguments -------------------------------------------------------------

RUNC_ARGS = ["--root", "/var/run/docker/runtime-runc/moby", "--log", "/run/log.json",
             "--log-format", "json", "--systemd-cgroup", "create", "--bundle", "/b",
             "--pid-file", "/p", "id"]


def test_split_runtime_args_strips_dkvm_flags():
    argv = (["--dkvm-runc=/usr/sbin/runc.real"] + RUNC_ARGS[:4] + ["--dkvm-accel=tcg"]
            + RUNC_ARGS[4:])
    assert split_runtime_args(argv) == (RUNC_ARGS, "/usr/sbin/runc.real", {"accel": "tcg"})


def test_split_runtime_args_separate_value():
    assert split_runtime_args(["--dkvm-runc", "/opt/runc"] + RUNC_ARGS) == \
        (RUNC_ARGS, "/opt/runc", {})


def test_split_runtime_args_leaves_runc_flags_alone():
    argv = ["--log=/x", "--debug", "--root", "/r", "--criu", "criu", "state", "abc123"]
    assert split_runtime_args(argv) == (argv, "", {})


def test_split_runtime_args_rejects_unknown_dkvm_flag():
    with pytest.raises(DkvmError) as info:
        split_runtime_args(["--dkvm-acel=tcg"] + RUNC_ARGS)
    msg = info.value.message
    assert "--dkvm-acel" in msg and "--dkvm-accel" in msg and "--dkvm-runc" in msg


def test_split_runtime_args_validates_accel():
    with pytest.raises(DkvmError) as info:
        split_runtime_args(["--dkvm-accel=fast"] + RUNC_ARGS)
    assert "--dkvm-accel" in info.value.message and "tcg" in info.value.message
