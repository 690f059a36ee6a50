"""The OCI runtime-tools validation suite (tests/conformance/runtime-tools-*.tar.gz,
Apache-2.0, with its vendored Go modules) run against runc and against dkvm-runtime,
and compared check by check.

Each of the suite's executables creates bundles from a busybox rootfs, drives the
runtime through create/start/kill/delete and prints TAP; many run `runtimetest` in the
container, whose own TAP comes back inside a YAML diagnostic of the outer check. A
check runc passes and dkvm fails is explained when it (or every inner check it
failed on, or the error the runtime printed for it) matches one of BY_DESIGN: what a
VM runtime does differently on purpose. Anything else is a regression.

`python3 tests/conformance/runtime_tools.py` prints the README's table."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "runtime-tools-260e151.tar.gz"
BUILD_DIR = Path("/var/cache/dkvm-tests") / SOURCE.name.replace(".tar.gz", "")
BUILD_TIMEOUT = 900
TEST_TIMEOUT = 300              # one executable: some boot a dozen VMs under TCG
DKVM_RUNTIME = "/usr/local/bin/dkvm-runtime"

# (pattern on a check's description or the runtime's error, the reason)
CAPABILITIES = ("the workload has the VM's root: every capability but those dropped from "
                "the engine's default set (systemd and dockerd run inside without "
                "--privileged); an exact set after --cap-drop ALL")
KERNEL_FILESYSTEMS = ("the guest's /dev is the VM kernel's devtmpfs (its own devices, "
                      "/dev/ptmx a node), /sys is writable for the workload, and /proc is "
                      "mounted last, with the workload's PID namespace")
BY_DESIGN = [
    (r"capability CAP_\w+ (not )?set", CAPABILITIES),
    (r"^mounts\[\d+\] \(/(dev|dev/pts|dev/shm|dev/mqueue|sys|proc)\) found", KERNEL_FILESYSTEMS),
    (r'^file at default symlink path "/dev/ptmx" is a symlink', KERNEL_FILESYSTEMS),
    (r"^mounts\[\d+\] \(/(tmp|mnt)/[\w-]+\) found",
     "a bind mount reaches the guest as part of the virtiofs export: one filesystem, "
     "not a mount of its own"),
    (r"memory limit \S+ \(--memory\) is too small to boot a VM",
     "a memory limit under 256 MiB (224 under KVM) cannot hold QEMU and a booting guest"),
    (r"get pids cgroup data",
     "the pids limit counts the workload's processes in the guest, not the container's "
     "cgroup on the host (there it would count QEMU's threads)"),
    (r"--network (host|container:NAME) is not supported",
     "the VM takes over a network namespace of its own: the host's or another "
     "container's (/proc/PID/ns/net) cannot be given to it"),
    (r"the VM's kernel has no driver for",
     "a device node the VM's kernel has no driver for is refused at create"),
    (r"^create namespace user without path",
     "a user namespace is made in the guest, for the workload; the container's process "
     "on the host (QEMU's side, which virtiofsd serves the export from as root) stays "
     "in the host's"),
    (r"MUST generate an error when invalid or unsupported values are encountered",
     "the workload is started in the VM, not at create: runc fails this bundle only "
     "because the suite leaves /runtimetest out of it (an invalid ociVersion passes "
     "runc too), and DKVM reports the missing program when the VM starts it (exit 127)"),
]

CHECK = re.compile(r"^(not )?ok (\d+)(?: - (.*?))?(?: # (?:SKIP|skip)\b.*)?$")
INNER_STDOUT = re.compile(r'"stdout": ("(?:[^"\\]|\\.)*")')


def build(source=SOURCE, build_dir=BUILD_DIR):
    """The suite's executables and runtimetest, built once per source (Debian's Go,
    offline: -mod=vendor). Returns the directory they run in."""
    done = build_dir / ".built"
    if done.exists():
        return build_dir
    build_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xzf", str(source), "-C", str(build_dir)], check=True,
                   timeout=BUILD_TIMEOUT)
    env = dict(os.environ, GOFLAGS="-mod=vendor", GOPROXY="off",
               GOCACHE=str(build_dir / ".gocache"), GOPATH=str(build_dir / ".gopath"))
    subprocess.run(["make", "runtimetest", "validation-executables"], cwd=build_dir, env=env,
                   check=True, capture_output=True, timeout=BUILD_TIMEOUT)
    done.write_text("")
    return build_dir


def executables(build_dir):
    return sorted(p.relative_to(build_dir) for p in build_dir.glob("validation/*/*.t"))


def run_suite(runtime, build_dir, names=None):
    """{test name: Test} for each executable (or those named), run with RUNTIME=runtime."""
    results = {}
    for exe in executables(build_dir):
        name = exe.parent.name
        if names and name not in names:
            continue
        try:
            out = subprocess.run([str(exe)], cwd=build_dir, env=dict(os.environ, RUNTIME=runtime),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 timeout=TEST_TIMEOUT, errors="replace").stdout
        except subprocess.TimeoutExpired as err:
            out = (err.stdout or b"").decode(errors="replace") + \
                f"\nnot ok 0 - timed out after {TEST_TIMEOUT}s\n"
        results[name] = parse(out)
    return results


class Check:
    def __init__(self, description, ok, skip, before, after):
        self.description, self.ok, self.skip = description, ok, skip
        self.before, self.after = before, after      # the output around it

    def inner_failures(self):
        """The failed checks of runtimetest's TAP in the diagnostic printed before it."""
        failed = []
        for match in INNER_STDOUT.finditer(self.before):
            for line in json.loads(match.group(1)).splitlines():
                inner = CHECK.match(line)
                if inner and inner.group(1):
                    failed.append(inner.group(3) or "")
        return failed

    def reasons(self):
        """Why dkvm fails it, if by design; None when something is not explained."""
        own = reasons_for(self.description)
        if own:
            return own
        inner = self.inner_failures()
        if inner:
            found = [reasons_for(text) for text in inner]
            return set().union(*found) if all(found) else None
        return reasons_for(self.before + self.after) or None


class Test:
    def __init__(self, checks, output):
        self.checks, self.output = checks, output

    def counts(self):
        ok = sum(c.ok and not c.skip for c in self.checks)
        skip = sum(c.skip for c in self.checks)
        return ok, sum(not c.ok for c in self.checks), skip

    def keyed(self):
        """{(description, occurrence): Check}: checks matched across runtimes."""
        seen, keyed = {}, {}
        for check in self.checks:
            n = seen[check.description] = seen.get(check.description, 0) + 1
            keyed[(check.description, n)] = check
        return keyed


def parse(output):
    lines = output.splitlines()
    marks = [(i, CHECK.match(line)) for i, line in enumerate(lines)]
    marks = [(i, m) for i, m in marks if m]
    checks = []
    for k, (i, match) in enumerate(marks):
        start = marks[k - 1][0] + 1 if k else 0
        end = marks[k + 1][0] if k + 1 < len(marks) else len(lines)
        skip = "# SKIP" in lines[i] or "# skip" in lines[i]
        checks.append(Check(match.group(3) or "", not match.group(1), skip,
                            "\n".join(lines[start:i]), "\n".join(lines[i + 1:end])))
    return Test(checks, output)


def reasons_for(text):
    return {reason for pattern, reason in BY_DESIGN if re.search(pattern, text, re.M)}


def compare(runc, dkvm):
    """{test: ({reasons by design}, [unexplained descriptions])} for every check runc
    passes that dkvm does not (a check dkvm never printed is judged by its output)."""
    result = {}
    for name, runc_test in runc.items():
        dkvm_test = dkvm.get(name) or Test([], "")
        theirs = dkvm_test.keyed()
        reasons, unexplained = set(), []
        for key, check in runc_test.keyed().items():
            if not check.ok or check.skip:
                continue
            mine = theirs.get(key)
            if mine is not None and mine.ok:
                continue
            why = mine.reasons() if mine is not None else reasons_for(dkvm_test.output)
            if why:
                reasons |= why
            else:
                unexplained.append(key[0] or f"check {key}")
        result[name] = (reasons, unexplained)
    return result


def table(runc, dkvm, differences):
    """The README's table: counts per executable, and why they differ."""
    numbered = {reason: n for n, reason in
                enumerate(dict.fromkeys(reason for _, reason in BY_DESIGN), start=1)}
    rows = ["| test | runc ok / not ok / skip | dkvm ok / not ok / skip | dkvm fails what "
            "runc passes, because |", "|---|---|---|---|"]
    totals = [[0, 0, 0], [0, 0, 0]]
    for name in sorted(runc):
        a, b = runc[name].counts(), (dkvm.get(name) or Test([], "")).counts()
        for total, counts in zip(totals, (a, b)):
            for i in range(3):
                total[i] += counts[i]
        reasons, unexplained = differences[name]
        why = ", ".join(f"({numbered[r]})" for r in sorted(reasons, key=numbered.get))
        if unexplained:
            why += (", " if why else "") + "NOT EXPLAINED: " + "; ".join(unexplained[:3])
        rows.append(f"| {name} | {' / '.join(map(str, a))} | {' / '.join(map(str, b))} | "
                    f"{why} |")
    rows.append(f"| **all** | {' / '.join(map(str, totals[0]))} | "
                f"{' / '.join(map(str, totals[1]))} | |")
    notes = [f"({n}) {reason}" for reason, n in numbered.items()]
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


def main(argv):
    names = set(argv[1:])
    build_dir = build()
    runc = run_suite("runc", build_dir, names)
    dkvm = run_suite(DKVM_RUNTIME, build_dir, names)
    print(table(runc, dkvm, compare(runc, dkvm)))


if __name__ == "__main__":
    main(sys.argv)
