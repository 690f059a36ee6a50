"""An idle container's memory on the host, for the benchmarks: start it, let it answer
an exec (a VM has booted by then), let it sit, read the memory of its processes from
/proc, remove it."""
import os
import subprocess
import time

TIMEOUT = 600


def descendants(pid):
    """`pid` and every process below it."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def rollup_mib(pid):
    """A process's smaps_rollup in MiB ({"Rss": ..., "Pss": ...}); {} once it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    fields[name] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return fields


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def idle_processes(runtime, image, settle, env=(), measure=None):
    """`measure(pids)` over the processes of an idle container of `image` (its PID 1 and
    everything below it), `settle` seconds after it answered an exec."""
    name = f"dkvm-bench-idle-{runtime}-{os.getpid()}"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    subprocess.run(["docker", "run", "-d", f"--runtime={runtime}", "--name", name,
                    *[f"--env={item}" for item in env], image, "sleep", "600"],
                   check=True, capture_output=True, timeout=TIMEOUT)
    try:
        subprocess.run(["docker", "exec", name, "true"], check=True, timeout=TIMEOUT)
        time.sleep(settle)
        pid = int(subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", name],
                                 check=True, capture_output=True, text=True).stdout)
        return measure(descendants(pid))
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
