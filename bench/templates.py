"""VM templates, for bench/all.py: the `docker run` that meets a machine with no template
yet (its create makes one, its VM boots cold), against the runs after it, restored
from that template, and cold (DKVM_TEMPLATE=0). bench/boot.py times the default
machine's restored and cold runs against bare QEMU; this is the first run's cost."""
import glob
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkvm.host.vm_size import split_limit  # noqa: E402

# a memory limit no other bench or test uses: its machine's template is new here
NEW_MACHINE_MIB = 901
TEMPLATES = "/var/lib/dkvm/*/templates"
TIMEOUT = 600


def template_dirs(limit_mib):
    """The template directories (of any build) of `-m {limit_mib}m`'s machine."""
    return sorted(path for accel in ("tcg", "kvm") for path in glob.glob(
        f"{TEMPLATES}/*-{accel}-*cpu-{split_limit(limit_mib, accel)[0]}m"))


def timed_run(image, *flags):
    start = time.monotonic()
    subprocess.run(["docker", "run", "--rm", "--runtime=dkvm", *flags, image, "true"],
                   check=True, capture_output=True, timeout=TIMEOUT)
    return time.monotonic() - start


def first_and_after(image, runs):
    """(first run with no template, [restored runs], [cold runs]) in seconds, for a
    machine whose template is removed first; restored and cold interleaved."""
    for path in template_dirs(NEW_MACHINE_MIB):
        shutil.rmtree(path)
    flags = ["-m", f"{NEW_MACHINE_MIB}m"]
    first = timed_run(image, *flags)
    if len(template_dirs(NEW_MACHINE_MIB)) != 1:
        raise RuntimeError(f"the first run of -m {NEW_MACHINE_MIB}m left no template")
    restored, cold = [], []
    for _ in range(runs):
        restored.append(timed_run(image, *flags))
        cold.append(timed_run(image, *flags, "-e", "DKVM_TEMPLATE=0"))
    return first, restored, cold


def report(first, restored, cold):
    """The lines bench/all.py prints."""
    def spread(times):
        return (f"{statistics.median(times):5.2f}  (min {min(times):.2f}, "
                f"max {max(times):.2f}, n {len(times)})")
    return "\n".join([
        f"templates: `docker run --rm true`, -m {NEW_MACHINE_MIB}m, a machine new to this run "
        "(wall seconds)",
        f"  first run (its create makes the template; the VM boots cold) {first:5.2f}",
        f"  restored from it, median {spread(restored)}",
        f"  cold (DKVM_TEMPLATE=0), median {spread(cold)}",
        f"  restored / cold {statistics.median(restored) / statistics.median(cold):.2f}x   "
        f"first - cold {first - statistics.median(cold):+.2f} s (making the template)"])


if __name__ == "__main__":
    print(report(*first_and_after(sys.argv[1] if len(sys.argv) > 1 else "dkvm-demo", 5)))
