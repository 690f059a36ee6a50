#!/usr/bin/env python3
"""Runtime wrapper benchmark: what `dkvm-runtime` costs on a call it only passes
through to runc (the engine makes several per container: state, start, kill, delete),
against runc itself, in one run.

Median of N batches of 10 calls each (default 20), interleaved. Needs dkvm installed (`dkvm-runtime`
in PATH).
"""
import argparse
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time


BATCH = 10


def timed(argv):
    """Seconds per call over a batch started from one shell (as an engine starts them:
    a small parent; a Python parent's own fork cost would blur a few milliseconds)."""
    command = " ".join(shlex.quote(arg) for arg in argv)
    start = time.monotonic()
    subprocess.run(["sh", "-c", f"for i in {' '.join(['1'] * BATCH)}; do {command}; done"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return (time.monotonic() - start) / BATCH


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=20)
    args = parser.parse_args()
    wrapper, runc = shutil.which("dkvm-runtime"), shutil.which("runc")
    with tempfile.TemporaryDirectory() as root:
        calls = {"state": ["--root", root, "state", "no-such-container"],
                 "features": ["features"]}
        results = {}
        for name, call in calls.items():
            pairs = [(timed([wrapper, *call]), timed([runc, *call])) for _ in range(args.runs)]
            results[name] = [statistics.median(side) for side in zip(*pairs)]
    print(f"runtime wrapper, median of {args.runs} batches (milliseconds per call)")
    for name, (dkvm, plain) in results.items():
        print(f"  {name:9s} dkvm-runtime {dkvm * 1000:6.2f}   runc {plain * 1000:6.2f}   "
              f"overhead {(dkvm - plain) * 1000:6.2f}")


if __name__ == "__main__":
    main()
