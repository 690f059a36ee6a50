"""`runc update` of a DKVM container. The VM's RAM is fixed when it boots, and the
container's memory limit holds all of it (vm_size.plan_memory). A lower limit would
be accepted by the cgroup while the guest has not yet touched its RAM, and the
host's OOM killer would end QEMU the first time it did. So a memory limit below
what the VM was sized for is refused, naming that floor. A higher limit, none, and
everything else `update` sets (CPU, pids, block I/O) are runc's, as is any
container that is not DKVM's, and a Kubernetes pod's member (host.pods: its process
runs in the sandbox's VM)."""
import json
import os

from dkvm import paths
from dkvm.errors import DkvmError
from dkvm.host import runc_cli
from dkvm.host.settings import SIZE_UNITS

MIB = SIZE_UNITS["m"]
UNITS = {**SIZE_UNITS, "b": 1, "t": 1 << 40}
# a VM not yet started has its size too (QEMU starts with `start`)
LIVE_STATUSES = ("created", "running", "paused")


def guard_memory_limit(call, runc):
    """Before `runc update` (`call`, a runc_cli.RuncCall): raises DkvmError for a memory
    limit the VM cannot live in. Resources it reads from standard input (`--resources
    -`) are put back there for runc."""
    stdin_data = memory_limit_check(call, runc)
    if stdin_data is not None:
        give_to_runc(stdin_data)


def memory_limit_check(call, runc, stdin_fd=0):
    """The check; returns what it read from standard input, or None."""
    stdin_data, limit = None, None
    source = call.flag("resources", "r")
    if source:
        try:
            if source == "-":
                stdin_data = text = read_all(stdin_fd)
            else:
                with open(source, "rb") as f:
                    text = f.read()
            limit = ((json.loads(text or b"{}").get("memory") or {}).get("limit"))
        except (OSError, ValueError, AttributeError):
            return stdin_data           # runc says what is wrong with it
    memory_flag = call.flag("memory", "m")
    if memory_flag is not None:
        limit = parse_bytes(memory_flag)
    if not isinstance(limit, int) or limit <= 0:
        return stdin_data
    floor = booted_vm_mib(runc, call)
    if floor and limit < floor * MIB:
        raise DkvmError(f"memory limit {limit // MIB}MiB is below what this VM was sized "
                        f"for when it booted ({floor}MiB: its RAM, QEMU and virtiofsd); "
                        f"a DKVM container's limit can be raised, not set below {floor}m")
    return stdin_data


def booted_vm_mib(runc, call):
    """The VM's size from the plan its entrypoint was started with, in the container's
    root (handoff: the runtime wrote it, the container cannot); 0 for a container
    that is not DKVM's or is gone."""
    state = runc_cli.container_state(runc, call)
    root, bundle = state.get("rootfs"), state.get("bundle")
    if state.get("status") not in LIVE_STATUSES or not isinstance(root, str) or \
            not isinstance(bundle, str) or root != os.path.join(os.path.realpath(bundle),
                                                                 paths.SKELETON):
        return 0                        # not DKVM's own root: the image's
    from dkvm.handoff import read_plan
    from dkvm.host.vm_size import vm_footprint_mib
    from dkvm.schema import POD_MEMBER, Plan
    try:
        plan = Plan.from_json(read_plan(root))
    except (OSError, ValueError, DkvmError):     # not a plan DKVM wrote
        return 0
    if plan.pod == POD_MEMBER:
        return 0                        # a pod's member: no VM, its limit is runc's
    return vm_footprint_mib(plan)


def parse_bytes(text):
    """runc's --memory: bytes, or a number with a unit (`256m`, `1G`, `512MiB`)."""
    word = text.strip().lower().removesuffix("ib").removesuffix("b")
    digits, unit = (word[:-1], word[-1]) if word[-1:] in UNITS and word[-1:] else (word, "")
    if not digits.isdigit():
        return None                     # runc refuses it
    return int(digits) * UNITS[unit]


def read_all(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def give_to_runc(stdin_data):
    """What was read from standard input becomes runc's standard input again."""
    fd = os.memfd_create("dkvm-update-resources")
    os.write(fd, stdin_data)
    os.lseek(fd, 0, os.SEEK_SET)
    os.dup2(fd, 0)
    os.close(fd)
