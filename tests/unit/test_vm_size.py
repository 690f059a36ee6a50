"""The VM's size out of the container's limits (host.vm_size): vCPUs from the CPU
limits, and guest RAM, TCG's translation cache and the exec relays' room out of the
memory limit, which holds the whole VM."""
import pytest

from dkvm.errors import DkvmError
from dkvm.host.vm_size import (DEFAULT_GUEST_MIB, EXEC_RELAY_MIB, MIB, MIN_GUEST_MIB,
                               VM_SIDE_MIB, container_side_mib, plan_memory, vcpus_for,
                               vm_footprint_mib)
from dkvm.schema import MOST_EXECS, Plan


def limited(limit_mib):
    """config.json's linux.resources with a memory limit (`-m <limit_mib>m`)."""
    return {"memory": {"limit": limit_mib * MIB}}


@pytest.mark.parametrize("limit_mib,guest_mib,cache_mib,execs", [
    (256, 128, 32, 4), (400, 246, 50, 6), (512, 336, 64, 8), (1024, 752, 128, 16),
    (2048, 1616, 256, 24), (8192, 7760, 256, 24)])
def test_tcg_cache_and_execs_scale_with_the_limit(limit_mib, guest_mib, cache_mib, execs):
    assert plan_memory(limited(limit_mib), "tcg") == (guest_mib, cache_mib, execs)
    plan = Plan(memory_mib=guest_mib, tcg_cache_mib=cache_mib, max_execs=execs)
    assert vm_footprint_mib(plan) == limit_mib


def test_the_memory_budget_holds_every_exec_relay():
    """The container side's share is the VM's (QEMU, virtiofsd, the entrypoint) and
    room for the execs the container may run at once, each a relay process there; a
    container without a limit runs the most."""
    assert container_side_mib(4) == VM_SIDE_MIB + 4 * EXEC_RELAY_MIB == 96
    assert plan_memory({}, "tcg")[2] == MOST_EXECS == 24


def test_under_kvm_there_is_no_translation_cache():
    assert plan_memory(limited(512), "kvm") == (512 - container_side_mib(8), 0, 8)


def test_no_memory_limit_means_the_default_guest():
    assert plan_memory({}, "tcg") == (DEFAULT_GUEST_MIB, 256, MOST_EXECS) == (1024, 256, 24)
    assert plan_memory({"memory": {"limit": 0}}, "kvm") == (DEFAULT_GUEST_MIB, 0, MOST_EXECS)


def test_memory_below_minimum():
    with pytest.raises(DkvmError) as info:
        plan_memory(limited(255), "tcg")
    msg = info.value.message
    assert "--memory" in msg and "255MiB" in msg and "at least 256m" in msg
    assert "QEMU, virtiofsd and 4 execs take 128MiB of it" in msg
    assert f"the guest needs {MIN_GUEST_MIB}MiB" in msg


def test_memory_at_minimum_boots():
    assert plan_memory(limited(256), "tcg")[0] == MIN_GUEST_MIB
    # under KVM there is no translation cache to hold
    assert plan_memory(limited(224), "kvm")[0] == MIN_GUEST_MIB
    with pytest.raises(DkvmError, match="at least 224m"):
        plan_memory(limited(223), "kvm")


@pytest.mark.parametrize("cpu,count", [
    ({}, 0),
    ({"shares": 0}, 0),
    ({"quota": 150000, "period": 100000}, 2),
    ({"quota": 50000, "period": 100000}, 1),
    ({"quota": 200000, "period": 100000}, 2),
    ({"quota": 200000}, 2),                       # default period 100ms
    ({"quota": -1, "period": 100000}, 0),
    ({"cpus": "0"}, 1),
    ({"cpus": "0-3,6"}, 5),
    ({"cpus": "0-3", "quota": 150000, "period": 100000}, 2),   # the smaller wins
    ({"cpus": "2", "quota": 400000, "period": 100000}, 1),
])
def test_vcpus_for(cpu, count):
    assert vcpus_for(cpu) == count
