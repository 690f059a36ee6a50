"""DKVM_* settings and the runtime's arguments parsed at create (host/settings.py): a bad
value fails `create` with one line that names the option and says what it accepts;
options that weaken the boundary are the operator's (a container's environment, the
image's ENV among it, sets them only where the host's policy file or the runtime's
arguments allow it); a kernel argument removal that names nothing is refused; an
unknown kernel names every choice. The option table itself is in test_options.py."""
import pytest

from unitutil import facts, load_config, rewrite, with_env
from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.host.settings import PERMISSIONS, Bool, Disks, Size, parse_settings, split_env
from dkvm.options import BY_ENV
from dkvm.schema import Disk, Options


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


def test_the_option_reads_its_text_once_into_the_plans_records():
    disks = Disks().parse("DKVM_DISKS", " /a.img , /data/ ,ext4, 1G ;;", None)
    assert disks == [Disk(file="/a.img", mount_point="/data", filesystem="ext4", size=1 << 30)]
    assert Disks().show(disks) == "/a.img,/data,ext4,1g"
    assert Disks().parse("DKVM_DISKS", Disks().show(disks), None) == disks


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


# --- what weakens the boundary is the operator's ------------------------------------

OPERATOR_ONLY = [("DKVM_KERNEL_APPEND=loglevel=4", "DKVM_KERNEL_APPEND"),
                 ("DKVM_SYS_ADMIN=1", "DKVM_SYS_ADMIN"),
                 ("DKVM_SYS_ADMIN=yes", "DKVM_SYS_ADMIN"),
                 ("DKVM_KERNEL=image", "DKVM_KERNEL=image"),
                 ("DKVM_KERNEL=image/6.1.0-9-amd64", "DKVM_KERNEL=image")]


def test_the_permissions_are_the_three_that_weaken_the_boundary():
    assert set(PERMISSIONS) == {"DKVM_KERNEL_APPEND", "DKVM_SYS_ADMIN", "DKVM_KERNEL=image"}


@pytest.mark.parametrize("setting,permission", OPERATOR_ONLY)
def test_a_container_cannot_set_what_weakens_the_boundary(setting, permission):
    msg = create_error(setting)
    assert msg == (f"{setting} is the operator's to set, not the container's: allow "
                   f"{permission} in {paths.POLICY_FILE} (\"container_may_set\") or "
                   f"with the runtime argument --dkvm-allow={permission}")


@pytest.mark.parametrize("setting,permission", OPERATOR_ONLY)
def test_the_policy_or_the_runtime_arguments_allow_it(setting, permission, monkeypatch):
    from dkvm.host.bundle import BundleLayout
    monkeypatch.setattr(BundleLayout, "image_kernel",
                        lambda self, release: ("/vmlinuz", release or "6.1.0-9-amd64"))
    config = with_env(load_config("plain"), setting)
    rewrite(config, policy_allows={permission})
    rewrite(config, defaults={"--dkvm-allow": permission})
    # one permission does not give another
    others = set(PERMISSIONS) - {permission}
    with pytest.raises(DkvmError, match="is the operator's to set"):
        rewrite(config, policy_allows=others, defaults={"--dkvm-allow": ",".join(others)})


@pytest.mark.parametrize("setting", ["DKVM_KERNEL_APPEND=", "DKVM_SYS_ADMIN=0",
                                     "DKVM_SYS_ADMIN=no", "DKVM_KERNEL=dkvm",
                                     "DKVM_KERNEL=debian", "DKVM_KERNEL_DEBUG=1",
                                     "DKVM_DEV_SHM_SIZE=128m", "DKVM_ACCEL=tcg"])
def test_what_keeps_the_boundary_stays_the_containers(setting):
    rewrite(with_env(load_config("plain"), setting))


def test_the_operators_own_values_need_no_permission():
    new, plan = rewrite(load_config("plain"),
                        defaults={"--dkvm-sys-admin": "1", "--dkvm-kernel-append": "loglevel=4"})
    assert "CAP_SYS_ADMIN" in new["process"]["capabilities"]["bounding"]
    assert plan.options.kernel_append == "loglevel=4"


def test_kernel_append_is_checked_wherever_it_comes_from():
    for how in ({"policy_allows": {"DKVM_KERNEL_APPEND"}},
                {"defaults": {"--dkvm-allow": "DKVM_KERNEL_APPEND"}}):
        msg = create_error("DKVM_KERNEL_APPEND=init=/rootfs/pwn", **how)
        assert msg.startswith("DKVM_KERNEL_APPEND: init=/rootfs/pwn is not accepted")
    with pytest.raises(DkvmError, match="^--dkvm-kernel-append: init=/x is not accepted"):
        rewrite(load_config("plain"), defaults={"--dkvm-kernel-append": "init=/x"})


def test_unknown_permission_in_runtime_arguments():
    msg = create_error(defaults={"--dkvm-allow": "DKVM_SYS_ADMIN,everything"})
    assert msg == ("--dkvm-allow: everything is not a permission: use DKVM_KERNEL=image, "
                   "DKVM_KERNEL_APPEND, DKVM_SYS_ADMIN")


def test_a_removal_that_names_nothing_is_refused_at_create():
    assert parse_settings({"DKVM_KERNEL_APPEND": "-tsc=reliable dkvm.x=1"}, None,
                          policy_allows={"DKVM_KERNEL_APPEND"})["kernel_append"]
    for typo in ("-tsc=unstable", "-root", "-console", "-init"):
        with pytest.raises(DkvmError, match=f"DKVM_KERNEL_APPEND: {typo} removes none"):
            parse_settings({"DKVM_KERNEL_APPEND": typo}, None)


def test_the_default_kernel_is_dkvms_and_an_unknown_one_names_every_choice():
    _, plan = rewrite(load_config("plain"))
    assert (plan.options.kernel, plan.boot.name) == ("dkvm", "dkvm")
    assert plan.boot.initrd == ""
    with pytest.raises(DkvmError) as info:
        rewrite(with_env(load_config("plain"), "DKVM_KERNEL=fedora"))
    assert "dkvm or dkvm/6.1.192-dkvm, debian or debian/6.1.0-28-amd64" in str(info.value) \
        or "debian or debian/6.1.0-28-amd64, dkvm or dkvm/6.1.192-dkvm" in str(info.value)
    assert "image (the image's own)" in str(info.value)
