"""The VM's size out of the container's limits: vCPUs from `--cpus`/`--cpuset-cpus`,
and guest RAM, TCG's translation cache and the exec relays' room out of `-m`, which
holds the whole VM (the container side's share included). Pure."""
import math

from dkvm.errors import DkvmError
from dkvm.schema import MOST_EXECS, Plan

MIB = 1 << 20
DEFAULT_GUEST_MIB = Plan.FIELDS["memory_mib"].default
MIN_GUEST_MIB = 128
# What the container needs beside guest RAM, inside its memory limit: QEMU's own
# memory (heap, threads, device state), virtiofsd and the entrypoint. Measured under
# TCG with guest RAM filled: 48 MiB of anonymous memory; the rest is headroom (the
# entrypoint's exec queues: 3/4 MiB an exec), and file pages (the payload's code) are
# reclaimable.
VM_SIDE_MIB = 80
# Each `docker exec` is a relay process in the container: 3.9 MiB each measured (the
# cgroup's usage with 10 relays running; 3.4 MiB of it their own anonymous memory, the
# rest kernel and shared code). A container runs an exec per EXEC_SHARE_MIB of its
# limit at once, at least MIN_EXECS, at most schema.MOST_EXECS (and that many without
# a limit): their room comes out of the limit, and a small VM is not made smaller
# still for execs it never runs (`-m 256m`: 4 execs, 16 MiB; `-m 1g`: 16, 64 MiB).
EXEC_RELAY_MIB = 4
EXEC_SHARE_MIB, MIN_EXECS = 64, 4
# Under TCG, QEMU's translation cache grows with the code the guest runs, up to
# 1 GiB by default: it is sized to the limit (an eighth, 32-256 MiB; 256 without
# one), so that the VM has a size a limit can hold. Smaller is slower for big
# workloads (systemd and dockerd inside: 75 s at 32 MiB, 54 s at 1 GiB).
TCG_CACHE_SHARE, TCG_CACHE_MIN_MIB, TCG_CACHE_MAX_MIB = 8, 32, 256


def vcpus_for(cpu):
    """`--cpus N` is a CFS quota; `--cpuset-cpus` a list. 0 means: no limit given."""
    quota, period = cpu.get("quota") or 0, cpu.get("period") or 100000
    counts = []
    if quota > 0:
        counts.append(max(1, math.ceil(quota / period)))
    if cpu.get("cpus"):
        counts.append(len(parse_cpuset(cpu["cpus"])))
    return min(counts) if counts else 0


def parse_cpuset(text):
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def tcg_cache_mib(limit_mib):
    return min(max(limit_mib // TCG_CACHE_SHARE, TCG_CACHE_MIN_MIB), TCG_CACHE_MAX_MIB)


def plan_memory(resources, accel):
    """(guest RAM, TCG translation cache (0 under KVM), execs at once): MiB, MiB and a
    count. The container's memory limit holds the whole VM, as `docker stats` shows
    it: guest RAM is what is left of it once QEMU, its translation cache, virtiofsd and
    the exec relays have theirs, so a guest that fills its RAM meets its own OOM
    killer, never the host's. Without a limit the guest gets the default."""
    limit = ((resources.get("memory") or {}).get("limit") or 0) // MIB
    if limit <= 0:
        return DEFAULT_GUEST_MIB, TCG_CACHE_MAX_MIB if accel == "tcg" else 0, MOST_EXECS
    guest, cache, execs = split_limit(limit, accel)
    if guest < MIN_GUEST_MIB:
        least = MIN_GUEST_MIB + container_side_mib(MIN_EXECS)
        while split_limit(least, accel)[0] < MIN_GUEST_MIB:    # the cache grows with it
            least += 1
        raise DkvmError(f"memory limit {limit}MiB (--memory) is too small to boot a VM: "
                        f"use at least {least}m (QEMU, virtiofsd and {execs} execs "
                        f"take {limit - guest}MiB of it, the guest needs {MIN_GUEST_MIB}MiB)")
    return guest, cache, execs


def split_limit(limit, accel):
    """(guest RAM, translation cache, execs) out of a limit in MiB."""
    cache = tcg_cache_mib(limit) if accel == "tcg" else 0
    execs = exec_slots(limit)
    return limit - container_side_mib(execs) - cache, cache, execs


def exec_slots(limit_mib):
    """How many `docker exec`s a container with this memory limit (MiB) runs at once."""
    return min(max(limit_mib // EXEC_SHARE_MIB, MIN_EXECS), MOST_EXECS)


def container_side_mib(execs):
    """The container side's share of the limit: QEMU, virtiofsd, the entrypoint, and
    room for `execs` exec relays."""
    return VM_SIDE_MIB + execs * EXEC_RELAY_MIB


def vm_footprint_mib(plan):
    """The most memory the VM can take: the least memory limit that holds it."""
    return plan.memory_mib + plan.tcg_cache_mib + container_side_mib(plan.max_execs)
