#!/usr/bin/env python3
"""System workloads, under runc and dkvm, in one run: seconds from `docker run` to
systemd's `running`, to dockerd answering inside, and for `docker stop` (SIGRTMIN+3,
systemd's clean shutdown).

runc needs what a systemd container needs there (`--tmpfs /run --tmpfs /run/lock`, the
host's cgroups), and `--privileged` for dockerd (`--runc-privileged`: a host that runs
inside a container may refuse it); dkvm needs neither, only a disk for
/var/lib/docker. A step a runtime cannot reach within the bound shows as n/a.

Uses the image the end-to-end tests build (Debian with systemd and docker.io,
`dkvm-test-system`: run `./test.sh -k system_workloads` once). Median of N runs.
"""
import argparse
import statistics
import subprocess
import time
import uuid

BOUND = 300
DOCKERD_BOUND = 120         # dockerd answers within this, once systemd runs
FLAGS = {
    "runc": ["--tmpfs", "/run", "--tmpfs", "/run/lock", "-v",
             "/sys/fs/cgroup:/sys/fs/cgroup:ro"],
    "dkvm": ["-e", "DKVM_DISKS=/docker.img,/var/lib/docker,ext4,8g"],
}


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=BOUND)


def until(start, probe, bound=BOUND):
    """Seconds since `start` when `probe()` first holds, or None within `bound`."""
    while time.monotonic() - start < bound:
        if probe():
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def one_run(runtime, image):
    name = f"dkvm-bench-system-{uuid.uuid4().hex[:8]}"
    times = {}
    try:
        start = time.monotonic()
        sh("docker", "run", "-d", f"--runtime={runtime}", "--name", name, *FLAGS[runtime],
           image)
        times["systemd running"] = until(start, lambda: sh(
            "docker", "exec", name, "systemctl", "is-system-running",
            check=False).stdout.strip() in ("running", "degraded"))
        times["dockerd answers"] = until(start, lambda: sh(
            "docker", "exec", name, "docker", "info", check=False).returncode == 0,
            (times["systemd running"] or BOUND) + DOCKERD_BOUND)
        start = time.monotonic()
        sh("docker", "stop", "-t", "60", name)
        times["docker stop"] = time.monotonic() - start
        return times
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def show(values):
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):6.1f}" if len(known) == len(values) else "   n/a"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=3)
    parser.add_argument("--image", default="dkvm-test-system")
    parser.add_argument("--runc-privileged", action="store_true")
    args = parser.parse_args()
    if args.runc_privileged:
        FLAGS["runc"].append("--privileged")
    if sh("docker", "image", "inspect", args.image, check=False).returncode != 0:
        raise SystemExit(f"no image {args.image}: run ./test.sh -k system_workloads once")
    results = {"runc": [], "dkvm": []}
    for _ in range(args.runs):              # interleaved, so drift hits both alike
        for runtime, runs in results.items():
            runs.append(one_run(runtime, args.image))
    print(f"system workloads, median of {args.runs} (seconds)")
    print(f"  {'':18s} {'runc':>6s} {'dkvm':>6s}  ratio")
    for step in ("systemd running", "dockerd answers", "docker stop"):
        cells = {rt: [run[step] for run in runs] for rt, runs in results.items()}
        shown = {rt: show(values) for rt, values in cells.items()}
        ratio = ""
        if "n/a" not in shown["runc"] + shown["dkvm"]:
            ratio = f"{float(shown['dkvm']) / max(float(shown['runc']), 0.1):5.1f}x"
        print(f"  {step:18s} {shown['runc']} {shown['dkvm']}  {ratio}")


if __name__ == "__main__":
    main()
