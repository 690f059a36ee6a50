#!/usr/bin/env python3
"""Runtime wrapper benchmark: what `dkvm-runtime` costs on a call it only passes
through to runc (the engine makes several per container: state, start, kill, delete),
and on `exec --process`, which it rewrites (one per `docker exec`; the process file,
as dockerd writes it, copied afresh before each call on both sides), against runc
itself, in one run.

Median of N batches of 10 calls each (default 20), interleaved. Needs dkvm installed (`dkvm-runtime`
in PATH).
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time


BATCH = 10


# a `docker exec -e A=b c sh` process file, as dockerd hands it to `runc exec`
EXEC_PROCESS = {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["sh"],
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "HOSTNAME=0123456789ab", "A=b"], "cwd": "/",
                "capabilities": {kind: ["CAP_CHOWN", "CAP_KILL", "CAP_NET_RAW"]
                                 for kind in ("bounding", "effective", "permitted")}}


def timed(argv, before=""):
    """Seconds per call over a batch started from one shell (as an engine starts them:
    a small parent; a Python parent's own fork cost would blur a few milliseconds);
    `before`, a shell command, runs before each call on both sides."""
    command = before + " ".join(shlex.quote(arg) for arg in argv)
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
        process, fresh = os.path.join(root, "process.json"), os.path.join(root, "fresh.json")
        with open(fresh, "w") as f:
            json.dump(EXEC_PROCESS, f)
        calls = {"state": ["--root", root, "state", "no-such-container"],
                 "features": ["features"],
                 "exec": ["--root", root, "exec", "--process", process, "--detach",
                          "no-such-container"]}
        before = {"exec": f"cp {shlex.quote(fresh)} {shlex.quote(process)}; "}
        results = {}
        for name, call in calls.items():
            first = before.get(name, "")
            pairs = [(timed([wrapper, *call], first), timed([runc, *call], first))
                     for _ in range(args.runs)]
            results[name] = [statistics.median(side) for side in zip(*pairs)]
    print(f"runtime wrapper, median of {args.runs} batches (milliseconds per call)")
    for name, (dkvm, plain) in results.items():
        print(f"  {name:9s} dkvm-runtime {dkvm * 1000:6.2f}   runc {plain * 1000:6.2f}   "
              f"overhead {(dkvm - plain) * 1000:6.2f}")


if __name__ == "__main__":
    main()
