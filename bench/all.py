#!/usr/bin/env python3
"""Every figure of DKVM's performance table in one run: boot per kernel (bench/boot.py,
against runc and bare QEMU), the runtime wrapper per call (bench/wrapper.py), exec
latency and stdin throughput (bench/exec.py), then here: the first run of a machine
new to its templates against the restored and cold runs after it (bench/templates.py),
stdout throughput of `docker run`, the host memory of an idle container (the PSS of
all its processes: dkvm's restored from a template and booted cold) and its memory
after a fill-and-free (bench/fill_free.py), each under runc and dkvm. A few minutes on
2 cores.

Needs the README set-up done (dockerd running, dkvm installed, the dkvm-demo image).
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

from fill_free import fill_and_free, report as fill_free_report
from idle import idle_processes, rollup_mib
from templates import first_and_after, report as templates_report, timed_run

HERE = Path(__file__).resolve().parent
TIMEOUT = 600


def run_bench(script, *args):
    """Another bench script's report, as it prints it."""
    out = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True,
                         text=True, timeout=TIMEOUT, check=True)
    return out.stdout.rstrip()


def stdout_mib_per_s(runtime, image, mib):
    """`docker run` writing `mib` MiB to stdout, read here as fast as it comes: MiB/s
    over the whole run (the boot included), and from its first byte to its last."""
    argv = ["docker", "run", "--rm", f"--runtime={runtime}", image, "dd", "if=/dev/zero",
            "bs=1M", f"count={mib}"]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    total, first = 0, None
    while chunk := proc.stdout.read1(1 << 20):
        first = first or time.monotonic()
        total += len(chunk)
    last = time.monotonic()
    proc.wait(timeout=TIMEOUT)
    if total != mib << 20:
        raise RuntimeError(f"{runtime}: {total} bytes of stdout, not {mib} MiB")
    return mib / (time.monotonic() - start), mib / (last - first)


def all_pss_mib(pids):
    return sum(rollup_mib(pid).get("Pss", 0.0) for pid in pids)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="dkvm-demo")
    parser.add_argument("--stdout-mib", type=int, default=200)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--template-runs", type=int, default=5)
    args = parser.parse_args()
    start = time.monotonic()
    reports = [run_bench("boot.py", "-n", "3", "--image", args.image),
               run_bench("wrapper.py", "-n", "10"),
               run_bench("exec.py", "-n", "30", "--image", args.image)]
    templates = first_and_after(args.image, args.template_runs)
    stdout = {runtime: stdout_mib_per_s(runtime, args.image, args.stdout_mib)
              for runtime in ("runc", "dkvm")}
    memory = {name: idle_processes(runtime, args.image, args.settle, env, measure=all_pss_mib)
              for name, runtime, env in (("runc", "runc", ()), ("dkvm", "dkvm", ()),
                                         ("dkvm cold", "dkvm", ["DKVM_TEMPLATE=0"]))}
    timed_run(args.image, "-m", "1g")      # the fill's machine's template made: it restores
    filled = {runtime: fill_and_free(runtime, args.image, args.settle)
              for runtime in ("runc", "dkvm")}
    print("\n\n".join(reports))
    print("\n" + templates_report(*templates))
    print(f"\n`docker run` writing {args.stdout_mib} MiB to stdout (MiB/s)")
    for what, index in (("whole run", 0), ("first byte to last", 1)):
        runc, dkvm = stdout["runc"][index], stdout["dkvm"][index]
        print(f"  {what:18}  runc {runc:7.1f}   dkvm {dkvm:7.1f}   dkvm / runc {dkvm / runc:.2f}x")
    print(f"\nidle container, PSS of all its processes after {args.settle:.0f} s (MiB)")
    print(f"  runc {memory['runc']:7.1f}   dkvm (restored) {memory['dkvm']:7.1f}   "
          f"dkvm cold (DKVM_TEMPLATE=0) {memory['dkvm cold']:7.1f}")
    print("\n" + fill_free_report(filled))
    print(f"\n(all of bench/all.py: {time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
