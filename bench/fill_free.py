"""Memory given back, for bench/all.py: a container (`-m 1g`) fills 512 MiB of its
/dev/shm (a tmpfs: in the guest under dkvm) and removes it; its host memory idle, at
the peak and 10 s after the removal. Under dkvm the guest's freed pages leave QEMU's
RAM only through the balloon's free page reporting (boot.machine.EVERY_VM_DEVICES).
Two readings each: the container's memory cgroup (what its limit counts) and the PSS
of its processes."""
import os
import subprocess
import time

from idle import descendants, rollup_mib

FILL_MIB = 512
AFTER = 10.0            # s after the removal: the target is idle + 64 MiB by then
TIMEOUT = 600
# /dev/shm big enough for the fill: Docker's flag for runc, DKVM's option for the guest
SHM = ["--shm-size=600m", "--env=DKVM_DEV_SHM_SIZE=600m"]


def cgroup_memory_file(pid):
    """The usage file of `pid`'s memory cgroup (cgroup v1's memory controller, or v2)."""
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in lines:
        if "memory" in controllers.split(","):
            return f"/sys/fs/cgroup/memory{path}/memory.usage_in_bytes"
    (path,) = [path for _, controllers, path in lines if controllers == ""]
    return f"/sys/fs/cgroup{path}/memory.current"


def fill_and_free(runtime, image, settle):
    """{"idle"|"peak"|"after": (cgroup MiB, PSS MiB)} for one container of `image`."""
    name = f"dkvm-bench-fill-{runtime}-{os.getpid()}"

    def docker(*args):
        return subprocess.run(["docker", *args], check=True, capture_output=True, text=True,
                              timeout=TIMEOUT).stdout
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    docker("run", "-d", f"--runtime={runtime}", "--name", name, "-m", "1g", *SHM, image,
           "sleep", "600")
    try:
        docker("exec", name, "true")
        time.sleep(settle)
        pid = int(docker("inspect", "-f", "{{.State.Pid}}", name))
        usage = cgroup_memory_file(pid)

        def reading():
            with open(usage) as f:
                cgroup = int(f.read()) / 2**20
            return cgroup, sum(rollup_mib(p).get("Pss", 0.0) for p in descendants(pid))
        found = {"idle": reading()}
        docker("exec", name, "dd", "if=/dev/zero", "of=/dev/shm/fill", "bs=1M",
               f"count={FILL_MIB}")
        found["peak"] = reading()
        docker("exec", name, "rm", "/dev/shm/fill")
        time.sleep(AFTER)
        found["after"] = reading()
        return found
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def report(found):
    """The lines bench/all.py prints: `found` is runtime -> fill_and_free()."""
    lines = [f"memory after fill-and-free: {FILL_MIB} MiB into /dev/shm and removed, -m 1g "
             f"(MiB: idle / peak / {AFTER:.0f} s after)"]
    for runtime, readings in found.items():
        for index, what in ((0, "cgroup"), (1, "PSS")):
            idle, peak, after = (readings[k][index] for k in ("idle", "peak", "after"))
            lines.append(f"  {runtime:5} {what:6}  {idle:6.0f} / {peak:6.0f} / {after:6.0f}"
                         f"   after - idle {after - idle:+5.0f}")
    return "\n".join(lines)
