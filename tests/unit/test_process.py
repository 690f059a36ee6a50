"""The workload's limits and privileges as the guest applies them (guest.process),
run for real in a forked child: rlimits, no-new-privileges, capabilities."""
import os

import pytest

from dkvm.guest.process import (become_and_exec, bounding_set, capability_masks,
                                last_capability)
from dkvm.kernel_names import CAPABILITIES, CAPABILITY_NUMBERS
from dkvm.schema import Capabilities, Process, Rlimit

LAST_CAP = 40
FULL = (1 << (LAST_CAP + 1)) - 1


def bit(*names):
    return sum(1 << CAPABILITY_NUMBERS[name] for name in names)


def test_the_vms_full_root_changes_nothing():
    assert capability_masks(Capabilities(), LAST_CAP) == (None, None)


def test_dropped_capabilities_leave_the_bounding_set():
    bounding, sets = capability_masks(Capabilities(drop=["CAP_NET_RAW", "CAP_SYS_BOOT"]),
                                      LAST_CAP)
    assert bounding == FULL & ~bit("CAP_NET_RAW", "CAP_SYS_BOOT")
    assert sets is None


def test_exact_sets_are_runcs():
    caps = Capabilities(exact=True, bounding=["CAP_KILL", "CAP_CHOWN"], effective=["CAP_KILL"])
    bounding, sets = capability_masks(caps, LAST_CAP)
    assert bounding == bit("CAP_KILL", "CAP_CHOWN")
    assert sets == {"effective": bit("CAP_KILL"), "permitted": 0, "inheritable": 0,
                    "ambient": 0}


def run_child(process):
    """Run `process` through become_and_exec: (exit code, what it wrote)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        become_and_exec((devnull, write_fd, write_fd), process)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        out = f.read()
    _, wstatus = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wstatus), out


def status_of(process):
    """A shell's report of its own status, run as `process`."""
    code, out = run_child(process)
    assert code == 0, out
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


SCRIPT = ("grep -E '^(CapBnd|CapEff|CapPrm|NoNewPrivs)' /proc/self/status; "
          "grep -E '^Max (open files|processes)' /proc/self/limits | tr -s ' ' | "
          "sed 's/^Max open files/nofile:/; s/^Max processes/nproc:/'")


def lacking():
    """What this test process's own bounding set lacks (a container runs the tests)."""
    held = bounding_set()
    return [name for number, name in enumerate(CAPABILITIES[:last_capability() + 1])
            if not held >> number & 1]


@pytest.mark.skipif(os.geteuid() != 0, reason="changes capabilities: needs root")
def test_limits_and_privileges_reach_the_process():
    drop = sorted(set(lacking()) | {"CAP_NET_RAW", "CAP_SYS_BOOT"})
    process = Process(args=["sh", "-c", SCRIPT], env=["PATH=/usr/bin:/bin"],
                      rlimits=[Rlimit(type="RLIMIT_NOFILE", soft=64, hard=64),
                               Rlimit(type="RLIMIT_NPROC", soft=4000, hard=4000)],
                      no_new_privileges=True, capabilities=Capabilities(drop=drop))
    status = status_of(process)
    assert status["nofile"].split()[:2] == ["64", "64"]
    assert status["nproc"].split()[:2] == ["4000", "4000"]
    assert status["NoNewPrivs"].strip() == "1"
    bounding = int(status["CapBnd"], 16)
    assert not bounding & bit("CAP_NET_RAW", "CAP_SYS_BOOT")
    assert bounding & bit("CAP_NET_ADMIN", "CAP_CHOWN") == bit("CAP_NET_ADMIN", "CAP_CHOWN")
    assert not int(status["CapEff"], 16) & ~bounding      # root's execve: within bounding


@pytest.mark.skipif(os.geteuid() != 0, reason="changes capabilities: needs root")
def test_exact_capabilities_for_a_user_keep_what_runc_would():
    caps = Capabilities(exact=True, bounding=["CAP_NET_BIND_SERVICE"],
                        effective=["CAP_NET_BIND_SERVICE"], permitted=["CAP_NET_BIND_SERVICE"],
                        inheritable=["CAP_NET_BIND_SERVICE"], ambient=["CAP_NET_BIND_SERVICE"])
    status = status_of(Process(args=["sh", "-c", SCRIPT], env=["PATH=/usr/bin:/bin"],
                               uid=1000, gid=1000, capabilities=caps))
    want = bit("CAP_NET_BIND_SERVICE")
    assert int(status["CapBnd"], 16) == int(status["CapEff"], 16) == want    # ambient
    assert status["NoNewPrivs"].strip() == "0"


def test_capabilities_beyond_the_bounding_set_held_are_refused_as_runc_refuses_them():
    """`docker exec --privileged` into a container without them: runc's error, 126."""
    if not lacking():
        pytest.skip("this process holds every capability")
    code, out = run_child(Process(args=["true"], env=["PATH=/usr/bin:/bin"]))
    assert code == 126
    assert out == "dkvm: unable to start container process: unable to apply caps: " \
        "operation not permitted\n"
