#!/usr/bin/env python3
"""docker exec benchmark: latency of `docker exec c true` (p50, p99) and throughput
of `docker exec -i c cat >/dev/null`, under runc and dkvm, in one run.

Needs the README set-up done (dockerd running, dkvm installed, the dkvm-demo image).
"""
import argparse
import statistics
import subprocess
import time

TIMEOUT = 600


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, timeout=TIMEOUT, **kw)


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--execs", type=int, default=50)
    parser.add_argument("--mib", type=int, default=200, help="MiB piped through cat")
    parser.add_argument("--image", default="dkvm-demo")
    args = parser.parse_args()
    data = b"\xa5" * (args.mib << 20)
    results = {}
    for runtime in ("runc", "dkvm"):
        name = f"dkvm-bench-exec-{runtime}"
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
        sh("docker", "run", "-d", f"--runtime={runtime}", "--name", name, args.image,
           "sleep", "3600")
        try:
            sh("docker", "exec", name, "true")              # waits for the VM to boot
            latencies = []
            for _ in range(args.execs):
                start = time.monotonic()
                sh("docker", "exec", name, "true")
                latencies.append(time.monotonic() - start)
            start = time.monotonic()
            sh("docker", "exec", "-i", name, "sh", "-c", "cat >/dev/null", input=data)
            throughput = args.mib / (time.monotonic() - start)
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
        results[runtime] = (statistics.median(latencies), percentile(latencies, 99), throughput)
    print(f"exec benchmark: {args.execs} x `docker exec c true`, {args.mib} MiB through cat")
    for runtime, (p50, p99, mibs) in results.items():
        print(f"  {runtime:5s} p50 {p50 * 1000:7.0f} ms  p99 {p99 * 1000:7.0f} ms  "
              f"stdin {mibs:7.1f} MiB/s")
    (r50, r99, rt), (d50, d99, dt) = results["runc"], results["dkvm"]
    print(f"  dkvm / runc: p50 {d50 / r50:.1f}x, p99 {d99 / r99:.1f}x, throughput {dt / rt:.2f}x")


if __name__ == "__main__":
    main()
