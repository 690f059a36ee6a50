"""DKVM_* options and runtime arguments: bad values fail `create` with a message that
names the option and says what it accepts; the option table is the one source of
names, defaults and the README's option table."""
import re
import subprocess

import pytest

from unitutil import REPO, facts, load_config, rewrite, with_env
from dkvm.errors import DkvmError
from dkvm.host.runc_cli import parse
from dkvm.host.vm_size import MIB, MIN_GUEST_MIB
from dkvm.options import BY_ENV, OPTIONS, Bool, Size, parse_settings, split_env
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


def test_memory_below_minimum():
    config = load_config("resources-tmpfs-volume")
    config["linux"]["resources"]["memory"]["limit"] = 255 * MIB
    with pytest.raises(DkvmError) as info:
        rewrite(config)
    msg = info.value.message
    assert "--memory" in msg and "255MiB" in msg and "at least 256m" in msg
    assert "QEMU, virtiofsd and 4 execs take 128MiB of it" in msg
    assert f"the guest needs {MIN_GUEST_MIB}MiB" in msg


def test_memory_at_minimum_boots():
    config = load_config("resources-tmpfs-volume")
    config["linux"]["resources"]["memory"]["limit"] = 256 * MIB
    _, plan = rewrite(config)
    assert plan.memory_mib == MIN_GUEST_MIB
    # under KVM there is no translation cache to hold
    config["linux"]["resources"]["memory"]["limit"] = 224 * MIB
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


def read_dkvm_flags(argv):
    """(runc's argv, --dkvm-runc, the operator's values) as the runtime parses them."""
    call = parse(argv)
    call.check()
    return call.runc_args(), call.runc, call.operator


def test_dkvm_flags_are_taken_out_of_runcs_line():
    argv = (["--dkvm-runc=/usr/sbin/runc.real"] + RUNC_ARGS[:4] + ["--dkvm-accel=tcg"]
            + RUNC_ARGS[4:])
    assert read_dkvm_flags(argv) == (RUNC_ARGS, "/usr/sbin/runc.real", {"--dkvm-accel": "tcg"})


def test_a_dkvm_flags_value_may_be_the_next_word():
    assert read_dkvm_flags(["--dkvm-runc", "/opt/runc"] + RUNC_ARGS) == \
        (RUNC_ARGS, "/opt/runc", {})
    assert read_dkvm_flags(["--dkvm-kernel-append", "-tsc"] + RUNC_ARGS)[2] == \
        {"--dkvm-kernel-append": "-tsc"}


def test_runcs_flags_are_left_alone():
    argv = ["--log=/x", "--debug", "--root", "/r", "--criu", "criu", "state", "abc123"]
    assert read_dkvm_flags(argv) == (argv, "", {})
    argv = ["--root", "/r", "exec", "--process", "/p", "--dkvm-like-arg", "abc123"]
    assert read_dkvm_flags(argv) == (argv, "", {})      # after the subcommand: runc's


def test_an_unknown_dkvm_flag_is_refused_naming_those_accepted():
    with pytest.raises(DkvmError) as info:
        read_dkvm_flags(["--dkvm-acel=tcg"] + RUNC_ARGS)
    msg = info.value.message
    assert "--dkvm-acel" in msg and "--dkvm-accel" in msg and "--dkvm-runc" in msg


def test_dkvm_flag_values_are_read_at_create_only():
    """A bad value in daemon.json fails `docker run`, not every `docker rm`."""
    assert read_dkvm_flags(["--dkvm-accel=fast"] + RUNC_ARGS)[2] == {"--dkvm-accel": "fast"}
    msg = create_error(defaults={"--dkvm-accel": "fast"})
    assert "--dkvm-accel" in msg and "tcg" in msg


def test_every_option_has_a_runtime_argument_and_allow_adds_up():
    argv = ["--dkvm-kernel-append", "loglevel=4", "--dkvm-sys-admin=1", "--dkvm-kernel=image",
            "--dkvm-allow=DKVM_SYS_ADMIN", "--dkvm-allow", "DKVM_KERNEL_APPEND"] + RUNC_ARGS
    rest, _, operator = read_dkvm_flags(argv)
    assert rest == RUNC_ARGS
    assert operator == {"--dkvm-kernel-append": "loglevel=4", "--dkvm-sys-admin": "1",
                        "--dkvm-kernel": "image",
                        "--dkvm-allow": "DKVM_SYS_ADMIN,DKVM_KERNEL_APPEND"}
    for option in OPTIONS:
        assert read_dkvm_flags([option.runtime_arg + "=x"])[2] == {option.runtime_arg: "x"}
    assert BY_ENV["DKVM_KERNEL_APPEND"].runtime_arg == "--dkvm-kernel-append"


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


def test_compose_passes_no_refused_word_on():
    """The container side composes the line from the plan: what create refuses never
    reaches the kernel from there either."""
    from dkvm.kernel_args import compose
    line = compose([], False, "loglevel=4 init=/x LD_PRELOAD=/y -- /bin/sh")
    assert line[-1] == "loglevel=4"
    assert not [w for w in line if w.startswith(("init=", "LD_PRELOAD", "--", "/bin"))]


def test_the_curated_parameters_are_the_kernels():
    """Each name is in Linux 6.1's kernel-parameters.txt or a __setup() of its source,
    where the build has unpacked it."""
    from dkvm.kernel_args import BOOT_PARAMETERS, KERNEL_PARAMETERS
    src = sorted((REPO / "build" / "kernel-src").glob("linux-source-6.1*"))
    if not src:
        pytest.skip("no unpacked linux-source-6.1 in build/")
    doc = (src[-1] / "Documentation/admin-guide/kernel-parameters.txt").read_text()
    documented = {m.group(1).replace("-", "_") for m in
                  re.finditer(r"^\t([A-Za-z0-9_.-]+)(?=[=\[\s]|$)", doc, re.M)}
    missing = [n for n in KERNEL_PARAMETERS | BOOT_PARAMETERS if n not in documented]
    setups = set()
    for name in missing:
        out = subprocess.run(
            ["grep", "-rqE", rf'(__setup|early_param)\("{name}=?"', str(src[-1] / "kernel"),
             str(src[-1] / "mm"), str(src[-1] / "init"), str(src[-1] / "block")])
        if out.returncode == 0:
            setups.add(name)
    assert sorted(set(missing) - setups) == []
