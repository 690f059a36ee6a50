#!/usr/bin/env python3
"""Pod benchmark: a Kubernetes pod driven over CRI as the kubelet drives it (the
suite's private containerd: tests/e2e/cri.py), per runtime handler (`runc`, `dkvm`):
RunPodSandbox to the first container's first line in its CRI log (its process ran),
and the host memory (PSS of every process in the pod's cgroup: a VM's container side
included) of the idle pod with one container and with two. Median of N (default 3).
Needs the README set-up done (dockerd running for the test images, dkvm installed).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "e2e"), str(REPO / "tests"), str(REPO)]

import cri  # noqa: E402
from idle import rollup_mib  # noqa: E402
from waiting import wait_until, wait_until_steady  # noqa: E402

HANDLERS = ("runc", "dkvm")


def pod_pss_mib(pod):
    total = 0.0
    for proc in Path("/proc").iterdir():
        try:
            inside = proc.name.isdigit() and f"pod{pod.uid}" in (proc / "cgroup").read_text()
        except OSError:
            continue
        if inside:
            total += rollup_mib(int(proc.name)).get("Pss", 0.0)
    return total


def logged(pod, name):
    path = pod.log_path(name)
    return Path(path).exists() and cri.read_log(path) != []


def one_pod(node, handler, number):
    """(start seconds, idle PSS with one container, with two) of one new pod."""
    started = time.monotonic()
    pod = cri.Pod(node, f"bench-{handler}-{number}")
    try:
        pod.run(handler)
        pod.start("main", "echo up; exec sleep 1000")
        wait_until(lambda: logged(pod, "main"), "the first container's first line",
                   timeout=cri.START_TIMEOUT, interval=0.01)
        elapsed = time.monotonic() - started
        one = wait_until_steady(lambda: round(pod_pss_mib(pod)), "the pod's memory to settle",
                                settle=2, timeout=120)
        pod.start("sidecar", "echo up; exec sleep 1000")
        wait_until(lambda: logged(pod, "sidecar"), "the second container's first line",
                   timeout=cri.START_TIMEOUT, interval=0.05)
        two = wait_until_steady(lambda: round(pod_pss_mib(pod)), "the pod's memory to settle",
                                settle=2, timeout=120)
        return elapsed, one, two
    finally:
        pod.delete()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3)
    args = parser.parse_args()
    daemon = cri.Containerd()
    daemon.start()
    node = None
    try:
        daemon.import_images()
        node = cri.Cri()
        node.remove_every_pod()
        runs = {handler: [] for handler in HANDLERS}
        for number in range(args.n):            # interleaved: drift hits both alike
            for handler in HANDLERS:
                runs[handler].append(one_pod(node, handler, number))
    finally:
        if node is not None:
            node.remove_every_pod()
            node.close()
        daemon.stop()
    print(f"pods over CRI, median of {args.n}: RunPodSandbox to the first container's first "
          "log line (s); idle pod's host memory, PSS (MiB)")
    for handler, figures in runs.items():
        start, one, two = (statistics.median(column) for column in zip(*figures))
        print(f"  {handler:5} start {start:5.2f}   one container {one:6.0f}   "
              f"two containers {two:6.0f}")


if __name__ == "__main__":
    main()
