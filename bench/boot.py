#!/usr/bin/env python3
"""Boot benchmark, per guest kernel: wall time of `docker run --rm IMAGE true` under
runc and under dkvm with each kernel the build carries (restored from the machine's
template, as by default, and booted cold with DKVM_TEMPLATE=0), and of bare QEMU
booting that kernel straight to power-off, in one run; then QEMU's memory for an idle
VM on each.

Median of N runs each (default 5), interleaved so that drift hits all alike; prints
the figures and the ratios. Needs the README set-up done (dockerd running, dkvm
installed, the dkvm-demo image).
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

from dkvm import paths  # noqa: E402
from dkvm.container.vmm import kernel_append, qemu_env  # noqa: E402
from dkvm.host.payload import ensure_payload, payload_kernels  # noqa: E402
from dkvm.boot.initramfs import initramfs  # noqa: E402
from idle import command_line, idle_processes, rollup_mib  # noqa: E402
from dkvm.options import BY_ENV  # noqa: E402
from dkvm.schema import Boot, Plan  # noqa: E402

POWEROFF_INIT = b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n"
TIMEOUT = 300


def timed(argv, env=None):
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=TIMEOUT, env=env)
    return time.monotonic() - start


def bare_qemu_argv(payload, boot, initrd, vcpus):
    """The dkvm VM's machine, kernel and command line, with nothing of DKVM's: no
    virtiofs, no serial ports, an initramfs that powers off at once."""
    plan = Plan()
    plan.boot = Boot.from_dict(boot.as_dict())
    plan.boot.initrd = initrd
    kernel = plan.boot.kernel.replace(paths.PAYLOAD_MOUNT, payload, 1)
    return paths.payload_program_argv(os.path.join(payload, "qemu", "qemu-system-x86_64"),
                                      payload) + [
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-L", os.path.join(payload, "qemu", "firmware"), "-machine", "pc",
        "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(vcpus),
        "-m", f"{plan.memory_mib}M", "-kernel", kernel, "-initrd", initrd,
        "-append", kernel_append(plan)]


def qemu_memory_mib(pids):
    """Resident and proportional memory (MiB) of the QEMU among `pids`."""
    for pid in pids:
        if b"qemu-system-x86_64" in command_line(pid):
            fields = rollup_mib(pid)
            return fields["Rss"], fields["Pss"]
    raise RuntimeError("no QEMU in the container")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=5)
    parser.add_argument("--image", default="dkvm-demo")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds an idle VM sits before its memory is read")
    args = parser.parse_args()

    payload = ensure_payload(str(REPO / "dist" / "dkvm.pyz"))
    kernels = payload_kernels(payload)
    vcpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        initrd = os.path.join(tmp, "poweroff.cpio")
        with open(os.path.join(payload, "bin", "busybox"), "rb") as f:
            busybox = f.read()
        with open(initrd, "wb") as f:
            f.write(initramfs(busybox, POWEROFF_INIT, []))
        env = dict(os.environ, **{k: v.replace(paths.PAYLOAD_MOUNT, payload)
                                  for k, v in qemu_env().items()})
        cases = {"runc": lambda: timed(["docker", "run", "--rm", "--runtime=runc", args.image,
                                        "true"])}
        for kernel, boot in kernels.items():
            argv = bare_qemu_argv(payload, boot, initrd, vcpus)
            cases[f"bare-qemu {kernel}"] = lambda argv=argv: timed(argv, env)
            for case, template in ((f"dkvm {kernel}", "1"), (f"dkvm-cold {kernel}", "0")):
                cases[case] = lambda kernel=kernel, template=template: timed(
                    ["docker", "run", "--rm", "--runtime=dkvm", "-e", f"DKVM_KERNEL={kernel}",
                     "-e", f"DKVM_TEMPLATE={template}", args.image, "true"])
            cases[f"dkvm {kernel}"]()       # its create makes the machine's template, if new
        results = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, run in cases.items():
                results[name].append(run())
    memory = {kernel: idle_processes("dkvm", args.image, args.settle,
                                     [f"DKVM_KERNEL={kernel}"], qemu_memory_mib)
              for kernel in kernels}

    med = {name: statistics.median(times) for name, times in results.items()}
    print(f"boot benchmark, median of {args.runs} (wall seconds, `true` to exit)")
    for name, times in results.items():
        print(f"  {name:20s} {med[name]:6.2f}  (min {min(times):.2f}, max {max(times):.2f})")
    for kernel in kernels:
        dkvm, bare = med[f"dkvm {kernel}"], med[f"bare-qemu {kernel}"]
        cold = med[f"dkvm-cold {kernel}"]
        print(f"  {kernel:8s} dkvm / runc {dkvm / med['runc']:5.1f}x   dkvm / bare-qemu "
              f"{dkvm / bare:5.2f}x   dkvm-cold / bare-qemu {cold / bare:5.2f}x   "
              f"dkvm / dkvm-cold {dkvm / cold:5.2f}x")
    default = BY_ENV["DKVM_KERNEL"].default
    for other in kernels:
        if other != default:
            print(f"  bare-qemu {other} / bare-qemu {default} (the default): "
                  f"{med[f'bare-qemu {other}'] / med[f'bare-qemu {default}']:.2f}x")
    print(f"idle VM, QEMU's memory after {args.settle:.0f} s (MiB)")
    for kernel, (rss, pss) in memory.items():
        print(f"  {kernel:8s} RSS {rss:6.1f}  PSS {pss:6.1f}")


if __name__ == "__main__":
    main()
