#!/usr/bin/env python3
"""`docker stop` latency on an idle busybox container whose workload exits on
SIGTERM at once, under runc and dkvm, in one run: the time from `docker stop` to its
return (the signal's way into the guest, the workload's exit, the VM's power-off).
With --kill, `docker kill` to `docker wait`'s return instead (SIGKILL: the runtime
has the workload killed in the guest first, then the VM goes).

Median of N runs each (default 5); needs the README set-up done (dockerd running,
dkvm installed, the dkvm-demo image).
"""
import argparse
import statistics
import subprocess
import time
import uuid

TIMEOUT = 300
WORKLOAD = 'trap "exit 0" TERM; echo ready; sleep 1000 & wait'


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=TIMEOUT)


def stop_once(runtime, image, kill=False):
    name = f"dkvm-bench-stop-{uuid.uuid4().hex[:8]}"
    try:
        sh("docker", "run", "-d", f"--runtime={runtime}", "--name", name, image, "sh", "-c",
           WORKLOAD)
        deadline = time.monotonic() + TIMEOUT
        while "ready" not in sh("docker", "logs", name).stdout:
            if time.monotonic() > deadline:
                raise SystemExit(f"{runtime}: the workload never started")
            time.sleep(0.1)
        start = time.monotonic()
        if kill:
            sh("docker", "kill", name)
            sh("docker", "wait", name)
        else:
            sh("docker", "stop", "-t", "30", name)
        elapsed = time.monotonic() - start
        code = sh("docker", "inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        if code != ("137" if kill else "0"):
            raise SystemExit(f"{runtime}: the workload exited {code}")
        return elapsed
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=5)
    parser.add_argument("--image", default="dkvm-demo")
    parser.add_argument("--kill", action="store_true", help="docker kill, not docker stop")
    args = parser.parse_args()
    results = {"runc": [], "dkvm": []}
    for _ in range(args.runs):              # interleaved, so drift hits both alike
        for runtime, times in results.items():
            times.append(stop_once(runtime, args.image, args.kill))
    med = {runtime: statistics.median(times) for runtime, times in results.items()}
    what = ("`docker kill` and `docker wait`" if args.kill
            else "`docker stop`, workload exits on SIGTERM")
    print(f"stop benchmark, median of {args.runs} (wall seconds of {what})")
    for runtime, times in results.items():
        print(f"  {runtime:5s} {med[runtime]:6.2f}  (min {min(times):.2f}, max {max(times):.2f})")
    print(f"  dkvm - runc  {med['dkvm'] - med['runc']:6.2f} s   dkvm / runc {med['dkvm'] / med['runc']:.1f}x")


if __name__ == "__main__":
    main()
