#!/usr/bin/env python3
"""Network benchmark: TCP throughput and round-trip time, host -> server and
container -> server, with the server in a runc container and in a DKVM VM, in one run.

Throughput: N MiB pushed by a Python client (from the host, or entered into a runc
peer's network namespace) into busybox `nc -l`; RTT: median of
20 pings. Needs the README set-up done (dockerd, dkvm installed, dkvm-demo image).
"""
import argparse
import re
import statistics
import subprocess
import time

TIMEOUT = 600
NET = "dkvm-bench-net"


def sh(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def rtt_ms(ping_output):
    times = [float(t) for t in re.findall(r"time=([\d.]+) ?ms", ping_output)]
    return statistics.median(times) if times else float("nan")


def wait_listening(name, port):
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if f":{port} " in sh("docker", "exec", name, "netstat", "-ltn").stdout:
            return
        time.sleep(0.5)
    raise SystemExit(f"{name} never listened on {port}")


PUSH = """
import socket, sys, time
ip, mib = sys.argv[1], int(sys.argv[2])
chunk = bytes(1 << 20)
start = time.monotonic()
with socket.create_connection((ip, 5001), timeout=60) as conn:
    for _ in range(mib):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)        # the server closes once it has read everything
print(mib / (time.monotonic() - start))
"""


def push(ip, mib, netns_pid=None):
    """MiB/s of `mib` MiB sent to the server, from the host or from inside the network
    namespace of a container (the host's Python, entered with nsenter)."""
    prefix = ["nsenter", "-t", str(netns_pid), "-n"] if netns_pid else []
    out = sh(*prefix, "python3", "-c", PUSH, ip, str(mib), check=True)
    return float(out.stdout)


def measure(runtime, image, mib):
    name = f"dkvm-bench-net-{runtime}"
    sh("docker", "rm", "-f", name)
    sh("docker", "run", "-d", f"--runtime={runtime}", "--name", name, "--network", NET, image,
       "sh", "-c", "while :; do nc -l -p 5001 >/dev/null; done")   # one client at a time
    try:
        wait_listening(name, 5001)
        ip = sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                name).stdout.strip()
        host_tput = push(ip, mib)
        host_rtt = rtt_ms(sh("docker", "run", "--rm", "--network", "host", image,   # host's stack
                             "ping", "-c", "20", "-i", "0.2", ip).stdout)
        peer = f"{name}-peer"
        sh("docker", "rm", "-f", peer)
        sh("docker", "run", "-d", "--name", peer, "--network", NET, image, "sleep", "600",
           check=True)
        try:
            pid = sh("docker", "inspect", "-f", "{{.State.Pid}}", peer).stdout.strip()
            peer_tput = push(ip, mib, netns_pid=pid)
            peer_rtt = rtt_ms(sh("docker", "exec", peer, "ping", "-c", "20", "-i", "0.2",
                                 ip).stdout)
        finally:
            sh("docker", "rm", "-f", peer)
        return host_tput, host_rtt, peer_tput, peer_rtt
    finally:
        sh("docker", "rm", "-f", name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--image", default="dkvm-demo")
    args = parser.parse_args()
    sh("docker", "network", "rm", NET)
    sh("docker", "network", "create", NET, check=True)
    try:
        results = {rt: measure(rt, args.image, args.mib) for rt in ("runc", "dkvm")}
    finally:
        sh("docker", "network", "rm", NET)
    print(f"network benchmark: {args.mib} MiB over TCP, RTT median of 20 pings")
    for rt, (ht, hr, pt, pr) in results.items():
        print(f"  {rt:5s} host->server {ht:7.1f} MiB/s rtt {hr:6.3f} ms | "
              f"container->server {pt:7.1f} MiB/s rtt {pr:6.3f} ms")
    r, d = results["runc"], results["dkvm"]
    print(f"  dkvm / runc: host throughput {d[0] / r[0]:.2f}x, host rtt {d[1] / r[1]:.1f}x, "
          f"container throughput {d[2] / r[2]:.2f}x, container rtt {d[3] / r[3]:.1f}x")


if __name__ == "__main__":
    main()
