#!/usr/bin/env python3
"""Soak: N cycles of `docker run -d` / `exec` / `stop` or `kill` / `rm` with DKVM, K at
a time, every step bounded; every R-th cycle also `docker restart`s its VM between
the exec and the end, and the cycles take the given images in turn. A step that
overstays its bound is a failure of kind `timeout:<step>`, and what diagnoses a
hang is saved first (to --diagnostics, named in the output): the container's log,
QEMU's threads (state, CPU time, kernel stack), QMP's `query-status` and `info
registers -a` for every vCPU, and, when the guest still answers an exec, its
kernel log after a SysRq backtrace of every CPU.

Prints: cycles, failures by kind, p50/p99 of each step, and where diagnostics went.
Exits non-zero when any cycle failed. Needs the README set-up done (dockerd running,
dkvm installed, the dkvm-demo image).

    bench/soak.py                          # 200 cycles, 4 at a time
    bench/soak.py -n 2000 -k 4 --docker-arg=--cpus=1
    bench/soak.py --image dkvm-demo --image my-debian --restart-every 3
    bench/soak.py --env DKVM_KERNEL_APPEND=... --kernel-debug
"""
import argparse
import collections
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKLOAD = 'trap "exit 0" TERM; echo ready; sleep 100000 & wait'
STEPS = ("boot", "exec", "restart", "stop", "kill", "rm")


class StepFailed(Exception):
    def __init__(self, kind, detail):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def docker(*args, timeout):
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def timed(step, bound, action, times, on_timeout):
    """Run `action` (which raises StepFailed on a wrong result) within `bound` seconds."""
    start = time.monotonic()
    try:
        action(bound)
    except subprocess.TimeoutExpired:
        on_timeout(step)
        raise StepFailed(f"timeout:{step}", f"over {bound}s") from None
    times[step].append(time.monotonic() - start)


def cycle(number, args, times, diagnose):
    """One run/exec/stop-or-kill/rm; the container is removed whatever happens."""
    name = f"dkvm-soak-{uuid.uuid4().hex[:10]}"
    env = [f"--env={setting}" for setting in args.env]
    if args.kernel_debug:
        env.append("--env=DKVM_KERNEL_DEBUG=1")
    bound = args.step_timeout
    image = args.image[number % len(args.image)]
    # an odd R: the restarted cycles end by stop and by kill in turn
    restarts = args.restart_every and number % args.restart_every == 0

    def on_timeout(step):
        diagnose(name, step, number)

    def wait_ready(step, limit, times_ready=1):
        """Until the workload has said `ready` that many times (once per start)."""
        deadline = time.monotonic() + limit
        while docker("logs", name, timeout=limit).stdout.count("ready") < times_ready:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("docker logs", limit)
            state = docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name,
                           timeout=limit).stdout.split()
            if state and state[0] == "exited":
                raise StepFailed(f"exited:{step}", f"{image}, exit code {state[1]}: "
                                 + docker("logs", name, timeout=limit).stderr[-300:])
            time.sleep(0.05)

    def boot(limit):
        out = docker("run", "-d", "--runtime=dkvm", "--name", name, *env, *args.docker_arg,
                     image, "sh", "-c", WORKLOAD, timeout=limit)
        if out.returncode != 0:
            raise StepFailed("error:boot", f"{image}: " + out.stderr.strip()[-300:])
        wait_ready("boot", limit)

    def restart(limit):
        out = docker("restart", "-t", "30", name, timeout=limit)
        if out.returncode != 0:
            raise StepFailed("error:restart", f"{image}: " + out.stderr.strip()[-300:])
        wait_ready("restart", limit, times_ready=2)

    def exec_(limit):
        out = docker("exec", name, "sh", "-c", f"echo exec-{number}; exit 3", timeout=limit)
        if (out.returncode, out.stdout) != (3, f"exec-{number}\n"):
            raise StepFailed("wrong:exec",
                             f"{image}: {out.returncode} {out.stdout!r} {out.stderr!r}")

    def end(limit):
        kill = number % 2 == 1
        out = docker("kill" if kill else "stop", *([] if kill else ["-t", "30"]), name,
                     timeout=limit)
        if out.returncode != 0:
            raise StepFailed(f"error:{'kill' if kill else 'stop'}", out.stderr.strip())
        code = docker("wait", name, timeout=limit).stdout.strip()
        if code != ("137" if kill else "0"):
            raise StepFailed(f"wrong:{'kill' if kill else 'stop'}", f"exit code {code}")

    def remove(limit):
        out = docker("rm", name, timeout=limit)
        if out.returncode != 0:
            raise StepFailed("error:rm", out.stderr.strip())

    try:
        timed("boot", bound, boot, times, on_timeout)
        timed("exec", bound, exec_, times, on_timeout)
        if restarts:
            timed("restart", bound, restart, times, on_timeout)
        timed("kill" if number % 2 else "stop", bound, end, times, on_timeout)
        timed("rm", bound, remove, times, on_timeout)
        return None
    except StepFailed as failure:
        return failure
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)


# --- what is saved when a step overstays its bound

def diagnose(directory, name, step, number):
    """Everything that tells a hung VM from a slow one, into directory/<cycle>-<name>."""
    target = Path(directory) / f"{number:05d}-{name}-{step}"
    target.mkdir(parents=True, exist_ok=True)

    def save(file, text):
        (target / file).write_text(text if isinstance(text, str) else repr(text))

    logs = docker("logs", name, timeout=30)
    save("docker-logs.stdout", logs.stdout)
    save("docker-logs.stderr", logs.stderr)
    save("inspect.json", docker("inspect", name, timeout=30).stdout)
    pid = docker("inspect", "-f", "{{.State.Pid}}", name, timeout=30).stdout.strip()
    if not pid.isdigit() or pid == "0":
        save("note", "the container has no running entrypoint")
        return
    for child in descendants(int(pid)):
        save(f"threads-{child['comm']}-{child['pid']}", threads(child["pid"]))
    save("qmp", qmp_report(int(pid)))
    try:         # a guest that still answers: every CPU's backtrace, in its kernel log
        out = docker("exec", name, "sh", "-c",
                     "if [ -e /proc/sysrq-trigger ]; then echo l > /proc/sysrq-trigger; "
                     "echo w > /proc/sysrq-trigger; sleep 1; fi; dmesg | tail -400",
                     timeout=20)
        save("guest-dmesg", out.stdout + out.stderr)
    except subprocess.TimeoutExpired:
        save("guest-dmesg", "the guest did not answer an exec within 20 s")


def descendants(pid):
    children, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in kids:
                children.append({"pid": int(kid), "comm": program_name(kid)})
                queue.append(int(kid))
    return children


def program_name(pid):
    """What a payload program is (they all start through the payload's ld.so)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    for arg in argv:
        name = os.path.basename(arg.decode(errors="replace"))
        if name.startswith(("qemu-system", "virtiofsd", "dkvm-")):
            return name
    return os.path.basename(argv[0].decode(errors="replace")) or "?"


def threads(pid):
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda p: int(p.name)):
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            wchan = (task / "wchan").read_text()
            stack = (task / "stack").read_text() if os.access(task / "stack", os.R_OK) else ""
        except OSError as err:
            lines.append(f"{task.name}: {err}")
            continue
        lines.append(f"{task.name} {comm} state={fields[0]} utime={fields[11]} "
                     f"stime={fields[12]} wchan={wchan}\n{stack}")
    return "\n".join(lines)


def qmp_report(entrypoint_pid):
    from dkvm import paths
    from dkvm.container.qmp import Qmp
    report = []
    try:
        qmp = Qmp(f"/proc/{entrypoint_pid}/root{paths.QMP_SOCKET}", timeout=10)
    except Exception as err:            # a diagnostic must not end the soak
        return f"QMP: {err!r}"
    try:
        report += [json.dumps(qmp.execute("query-status")),
                   json.dumps(qmp.execute("query-cpus-fast"), indent=1)]
        for command in ("info registers -a", "info irq", "info pic"):
            report.append(f"== {command}\n" + str(qmp.execute(
                "human-monitor-command", **{"command-line": command})))
    except Exception as err:
        report.append(f"QMP: {err!r}")
    finally:
        qmp.close()
    return "\n".join(report)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--cycles", type=int, default=200)
    parser.add_argument("-k", "--parallel", type=int, default=4)
    parser.add_argument("--image", action="append",
                        help="an image for the cycles to take in turn (repeatable; "
                             "default dkvm-demo)")
    parser.add_argument("--restart-every", type=int, default=5, metavar="R",
                        help="every R-th cycle restarts its VM (default 5; 0: never)")
    parser.add_argument("--step-timeout", type=float, default=180,
                        help="seconds any one step may take (default 180)")
    parser.add_argument("--env", action="append", default=[],
                        help="a DKVM_* setting for every container (repeatable)")
    parser.add_argument("--docker-arg", action="append", default=[],
                        help="a `docker run` flag for every container, e.g. --cpus=1")
    parser.add_argument("--kernel-debug", action="store_true",
                        help="the guest console in each container's log")
    parser.add_argument("--diagnostics", default=f"/var/tmp/dkvm-soak-{int(time.time())}")
    args = parser.parse_args()
    args.image = args.image or ["dkvm-demo"]

    times = collections.defaultdict(list)
    failures = collections.Counter()
    examples = {}
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        jobs = [pool.submit(cycle, n, args, times,
                            lambda name, step, n: diagnose(args.diagnostics, name, step, n))
                for n in range(args.cycles)]
        for done, job in enumerate(concurrent.futures.as_completed(jobs), start=1):
            failure = job.result()
            if failure:
                failures[failure.kind] += 1
                examples.setdefault(failure.kind, failure.detail)
                print(f"cycle failed: {failure}", flush=True)
            if done % 50 == 0:
                print(f"{done}/{args.cycles} cycles, {sum(failures.values())} failed, "
                      f"{time.monotonic() - started:.0f}s", flush=True)

    print(f"cycles: {args.cycles}, {args.parallel} at a time, in "
          f"{time.monotonic() - started:.0f}s; images: {' '.join(args.image)}; restart every "
          f"{args.restart_every or 'never'}; flags: {' '.join(args.docker_arg) or '-'}; "
          f"env: {' '.join(args.env) or '-'}")
    print(f"failures: {sum(failures.values())}" + "".join(
        f"\n  {kind}: {count} (e.g. {examples[kind]})" for kind, count in failures.items()))
    for step in STEPS:
        if times[step]:
            print(f"{step:5s} n={len(times[step]):4d} p50={statistics.median(times[step]):6.2f}s "
                  f"p99={percentile(times[step], 0.99):6.2f}s max={max(times[step]):6.2f}s")
    if Path(args.diagnostics).exists():
        print(f"diagnostics: {args.diagnostics}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
