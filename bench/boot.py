#!/usr/bin/env python3
"""Boot benchmark: wall time of `docker run --rm IMAGE true` under runc and under
dkvm, and of bare QEMU booting the same kernel straight to poweroff, in one run.

Median of N runs each (default 5); prints the figures and the ratios. Needs the
README set-up done (dockerd running, dkvm installed, the dkvm-demo image).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from build import cpio_newc  # noqa: E402
from dkvm import paths  # noqa: E402
from dkvm.container.vmm import kernel_append, qemu_env  # noqa: E402
from dkvm.host.payload import ensure_payload, payload_kernels  # noqa: E402
from dkvm.schema import Plan  # noqa: E402

POWEROFF_INIT = b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n"
TIMEOUT = 300


def timed(argv, env=None):
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=TIMEOUT, env=env)
    return time.monotonic() - start


def bare_qemu_argv(payload, initrd, vcpus):
    """The dkvm VM's machine, kernel and command line, with nothing of DKVM's: no
    virtiofs, no serial ports, an initramfs that powers off at once."""
    plan = Plan()
    plan.boot = payload_kernels(payload)[plan.options.kernel]
    kernel = plan.boot.kernel.replace(paths.PAYLOAD_MOUNT, payload, 1)
    return paths.payload_program_argv(os.path.join(payload, "qemu", "qemu-system-x86_64"),
                                      payload) + [
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-L", os.path.join(payload, "qemu", "firmware"), "-machine", "pc",
        "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(vcpus),
        "-m", f"{plan.memory_mib}M", "-kernel", kernel, "-initrd", initrd,
        "-append", kernel_append(plan)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=5)
    parser.add_argument("--image", default="dkvm-demo")
    args = parser.parse_args()

    payload = ensure_payload(str(REPO / "dist" / "dkvm.pyz"))
    with tempfile.TemporaryDirectory() as tmp:
        initrd = os.path.join(tmp, "poweroff.cpio")
        with open(os.path.join(payload, "bin", "busybox"), "rb") as f:
            busybox = f.read()
        with open(initrd, "wb") as f:
            f.write(cpio_newc([("bin", 0o40755, None), ("dev", 0o40755, None),
                               ("dev/console", 0o20600, None, (5, 1)),
                               ("bin/busybox", 0o100755, busybox),
                               ("init", 0o100755, POWEROFF_INIT)]))
        env = dict(os.environ, **{k: v.replace(paths.PAYLOAD_MOUNT, payload)
                                  for k, v in qemu_env().items()})
        cases = {
            "runc": lambda: timed(["docker", "run", "--rm", "--runtime=runc", args.image, "true"]),
            "dkvm": lambda: timed(["docker", "run", "--rm", "--runtime=dkvm", args.image, "true"]),
            "bare-qemu": lambda: timed(bare_qemu_argv(payload, initrd, len(os.sched_getaffinity(0))),
                                       env),
        }
        results = {name: [] for name in cases}
        for _ in range(args.runs):          # interleaved, so drift hits all alike
            for name, run in cases.items():
                results[name].append(run())
    med = {name: statistics.median(times) for name, times in results.items()}
    print(f"boot benchmark, median of {args.runs} (wall seconds, `true` to exit)")
    for name, times in results.items():
        print(f"  {name:10s} {med[name]:6.2f}  (min {min(times):.2f}, max {max(times):.2f})")
    print(f"  dkvm / runc      {med['dkvm'] / med['runc']:6.1f}x")
    print(f"  dkvm / bare-qemu {med['dkvm'] / med['bare-qemu']:6.2f}x")


if __name__ == "__main__":
    main()
