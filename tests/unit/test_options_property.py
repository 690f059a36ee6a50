"""An integration test of the options table, host/settings and the runtime's main:
what a user sees at create is the property, whichever layer refuses the value.
The options table under random, huge and malformed values: whatever a container's
environment or the operator's runtime arguments hold, create gives a value the plan
and the guest kernel hold, or one printable line naming the option (exit 125 from
`docker run`) -- never another exception, never a traceback."""
import random
import string

import pytest

from unitutil import bundle_with, facts, load_config, rewrite, with_env
from dkvm import kernel_args
from dkvm.container.vmm import kernel_append
from dkvm.errors import DkvmError, run_role
from dkvm.host.settings import MAX_DISK, PERMISSIONS, parse_settings
from dkvm.options import OPTIONS
from dkvm.roles import runtime
from dkvm.schema import Plan

SEED = 24
ROUNDS = 400            # values per option through parse_settings
REWRITES = 40           # of them, through the whole create rewrite and the plan's schema
SAMPLES = {             # valid values, to mutate
    "DKVM_ACCEL": ["auto", "kvm", "tcg"],
    "DKVM_KERNEL": ["dkvm", "debian", "debian/6.1.0-28-amd64", "image", "image/6.1.0-9-amd64"],
    "DKVM_KERNEL_APPEND": ["loglevel=4", "-tsc mitigations=off", "ipv6.disable=1 quiet"],
    "DKVM_KERNEL_DEBUG": ["1", "0", "yes"],
    "DKVM_TEMPLATE": ["1", "0", "yes"],
    "DKVM_KERNEL_MOUNT_LIB_MODULES": ["1", "false"],
    "DKVM_DEV_SHM_SIZE": ["64m", "1g", "512k", "4096"],
    "DKVM_SYS_ADMIN": ["1", "0"],
    "DKVM_BOOT_TIMEOUT": ["90", "300s"],
    "DKVM_WATCHDOG": ["120", "5s"],
    "DKVM_DISKS": ["/disks/a.img,/var/lib/docker,ext4,10g",
                   "/a,/b,ext2,16m;/c,/d,ext3,2g"],
}
ALPHABET = (string.printable + "\x00\x1b\x7f\u00e9\u0661\u2028\ufeff" + "=,;/-.\"' "
            + string.digits * 4 + "kmgtbs")


def huge_number(rng):
    digits = rng.choice([19, 20, 21, 400, 4301, 5000])
    return "9" * digits + rng.choice(["", "s", "k", "m", "g", "t", "gb"])


def mutate(rng, text):
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        where = rng.randint(0, len(chars))
        how = rng.random()
        if how < 0.4:
            chars.insert(where, rng.choice(ALPHABET))
        elif how < 0.7 and chars:
            del chars[min(where, len(chars) - 1)]
        elif chars:
            chars[min(where, len(chars) - 1)] = rng.choice(ALPHABET)
    return "".join(chars)


def values_for(option, rng):
    samples = SAMPLES[option.env]
    for _ in range(ROUNDS):
        pick = rng.random()
        if pick < 0.35:
            yield mutate(rng, rng.choice(samples))
        elif pick < 0.5:
            yield "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        elif pick < 0.6:
            yield huge_number(rng)
        elif pick < 0.7:
            yield rng.choice(samples) * rng.choice([2, 100, 5000])
        elif pick < 0.8:
            yield rng.choice(["", " ", "0", "-1", "\x00", "\n", "1\n", "\t1", "\u0661",
                              "1" * 100000, "a" * 100000, "=", "--", '"', "1e9", "0x10"])
        elif pick < 0.9:
            # disks: sizes near and beyond what ext2/3/4 hold, in every option
            size = rng.choice([MAX_DISK, MAX_DISK + 1, 1 << 60, 1 << 64, (1 << 44)])
            yield f"/d.img,/mnt,{rng.choice(['ext4', 'ext3', 'ext2'])},{size}"
        else:
            yield " ".join(rng.choice(["loglevel=4", "init=/x", "a.b=1", "sysctl.x=1", "--",
                                       "LD_PRELOAD=/x", "-tsc", "x" * 700, "quiet"])
                           for _ in range(rng.randint(1, 6)))


def one_line_naming(err, name):
    msg = err.message
    assert msg.isprintable() and msg.strip() == msg, repr(msg[:200])
    assert name in msg, (name, msg[:200])
    assert len(msg) < 2 * 4096, len(msg)


def check_accepted(option, values):
    """What create accepts, the container side and the guest kernel hold."""
    value = values[option.attr]
    assert type(value) is type(option.default)
    if option.env == "DKVM_KERNEL_APPEND":
        for debug in (False, True):
            for initrd in ("", "/k/initrd.img"):
                plan = Plan()
                plan.options.kernel_debug, plan.options.kernel_append = debug, value
                plan.boot.initrd = initrd
                assert len(kernel_append(plan)) <= kernel_args.COMMAND_LINE_MAX
    if option.env == "DKVM_DISKS":
        assert all(16 << 20 <= disk.size <= MAX_DISK for disk in value)
        assert Plan.from_json(Plan(disks=value).to_json()).disks == value


@pytest.mark.parametrize("option", OPTIONS, ids=[option.env for option in OPTIONS])
def test_every_value_gives_a_value_or_one_line(option):
    rng = random.Random(f"{SEED}-{option.env}")
    host = facts()
    for index, value in enumerate(values_for(option, rng)):
        ways = [({option.env: value}, {}, PERMISSIONS, option.env),
                ({option.env: value}, {}, (), option.env),
                ({}, {option.runtime_arg: value}, (), option.runtime_arg)]
        for settings, runtime_args, allows, name in ways:
            try:
                values = parse_settings(settings, host, runtime_args, allows)
            except DkvmError as err:
                one_line_naming(err, name)
            else:
                check_accepted(option, values)
        if index < REWRITES:
            try:
                _, plan = rewrite(with_env(load_config("plain"), f"{option.env}={value}"),
                                  policy_allows=PERMISSIONS)
            except DkvmError as err:
                one_line_naming(err, option.env)
            else:
                Plan.from_json(plan.to_json())      # the container side reads it back


def test_the_kernel_append_bound_leaves_dkvms_own_line_room():
    """The longest line DKVM writes itself (direct boot, with DKVM_KERNEL_DEBUG) and the
    longest DKVM_KERNEL_APPEND fit x86's command line together."""
    plan = Plan()
    plan.options.kernel_debug = True
    own = len(kernel_append(plan))
    assert own + 1 + kernel_args.MAX_APPEND <= kernel_args.COMMAND_LINE_MAX


@pytest.mark.parametrize("env", [
    "DKVM_BOOT_TIMEOUT=" + "9" * 400, "DKVM_DEV_SHM_SIZE=" + "1" * 5000 + "m",
    f"DKVM_DISKS=/d.img,/mnt,ext4,{1 << 61}", "DKVM_DISKS=/d.img,/mnt,ext4,100000g",
    "DKVM_KERNEL_APPEND=init=/rootfs/pwn", "DKVM_KERNEL_APPEND=" + "quiet " * 1000,
    "DKVM_SYS_ADMIN=1", "DKVM_KERNEL=image", "DKVM_WATCHDOG=\x1b]0;pwned\x07",
    "DKVM_\x1b[2J=1"])
def test_the_runtime_exits_with_one_line(env, fake_host, tmp_path, capsys,
                                         log_context):
    """The runtime's entry, as the engine runs it: a non-zero exit and one line on
    stderr, and nothing run."""
    bundle = bundle_with(tmp_path, with_env(load_config("plain"), env))
    log_context.set_role("runtime")
    with pytest.raises(SystemExit) as info:
        run_role(runtime.main, ["dkvm-runtime", "create", "--bundle", str(bundle), "id"])
    assert info.value.code == 1 and "exec" not in fake_host
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and err[:-1].isprintable(), err
    assert "Traceback" not in err and "DKVM_" in err


@pytest.mark.parametrize("arg", ["--dkvm-boot-timeout=" + "9" * 400,
                                 "--dkvm-kernel-append=init=/x", "--dkvm-allow=ALL",
                                 "--dkvm-disks=/d,/m,ext4,100000g", "--dkvm-accel=\x1b[2J",
                                 "--dkvm-bogus=1", "--dkvm-\x1b]0;x\x07=1"])
def test_the_runtime_exits_with_one_line_for_its_own_arguments(arg, fake_host,
                                                               tmp_path, capsys, log_context):
    bundle = bundle_with(tmp_path, load_config("plain"))
    log_context.set_role("runtime")
    with pytest.raises(SystemExit) as info:
        run_role(runtime.main, ["dkvm-runtime", arg, "create", "--bundle", str(bundle), "id"])
    assert info.value.code == 1 and "exec" not in fake_host
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err[:-1].isprintable(), err
    named = arg.partition("=")[0] if arg.isprintable() else "--dkvm-"
    assert named in err and "Traceback" not in err
