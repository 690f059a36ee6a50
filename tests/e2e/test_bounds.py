"""Every input is bounded in time and memory, with one line when a bound is hit: an
image kernel's modules (the initramfs the container side builds from them), the
descriptors a guest holds in virtiofsd, and `docker exec` relays inside the
container's memory limit (QEMU is never what the kernel's OOM killer takes)."""
import concurrent.futures
import lzma
import tempfile
import time
from pathlib import Path

import pytest

from dockerutil import PATH_ENV, busybox_tree, dkvm_lines, docker_import, docker_run, sh
from waiting import wait_until

RELEASE = "6.1.0-evil"
MODULES = f"lib/modules/{RELEASE}"


def fake_bzimage(release):
    """Enough of an x86 bzImage for DKVM to find it and read its release (setup
    header "HdrS", the version string it points to): the modules fail before QEMU
    would ever read the rest."""
    data = bytearray(4096)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    version = f"{release} (evil@example) #1 SMP".encode()
    data[0x400:0x400 + len(version)] = version
    return bytes(data)


def hostile_modules(root, kind):
    mods = root / MODULES
    (mods / "kernel").mkdir(parents=True)
    (mods / "modules.builtin").write_text("")
    if kind == "lines":             # more index than any kernel has
        lines = [f"kernel/m{i}.ko: kernel/m{i + 1}.ko" for i in range(100_000)]
    elif kind == "chain":           # a dependency chain as deep as the index allows
        lines = [f"kernel/m{i}.ko: kernel/m{i + 1}.ko" for i in range(60_000)]
        lines.append("kernel/virtio_pci.ko: kernel/m0.ko")
    else:                           # 10 KiB of xz that unpacks to 64 MiB
        lines = ["kernel/virtio_pci.ko.xz:"]
        (mods / "kernel" / "virtio_pci.ko.xz").write_bytes(
            lzma.compress(bytes(64 << 20)))
        for name in ("virtiofs", "virtio_console", "virtio_net"):
            lines.append(f"kernel/{name}.ko:")
            (mods / "kernel" / f"{name}.ko").write_bytes(b"\x7fELF")
    (mods / "modules.dep").write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def image_kernel_allowed(docker):
    """The operator's policy lets containers ask for the image's kernel (the hostile
    image is what is tested here, not the policy); the file is as it was afterwards."""
    policy = Path("/etc/dkvm/policy.json")
    before = policy.read_bytes() if policy.exists() else None
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text('{"container_may_set": ["DKVM_KERNEL=image"]}\n')
    policy.chmod(0o644)
    yield
    if before is None:
        policy.unlink()
    else:
        policy.write_bytes(before)


@pytest.fixture(scope="module")
def hostile_kernel_images(busybox_image, image_kernel_allowed):
    names = {kind: f"dkvm-test-bounds-{kind}" for kind in ("lines", "chain", "bomb")}
    for kind, name in names.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            busybox_tree(root)
            (root / "boot").mkdir()
            (root / "boot" / f"vmlinuz-{RELEASE}").write_bytes(fake_bzimage(RELEASE))
            hostile_modules(root, kind)
            docker_import(root, name, [PATH_ENV])
    yield names
    sh("docker", "rmi", "-f", *names.values(), check=False)


@pytest.mark.parametrize("kind,line", [
    ("lines", f"DKVM_KERNEL=image: the image's /{MODULES}/modules.dep has more than 65536 "
              "lines"),
    ("chain", f"DKVM_KERNEL=image: {RELEASE}: more than 64 modules to load at boot"),
    ("bomb", "DKVM_KERNEL=image: the initramfs would be larger than 12 MiB (the container's "
             f"/run holds 16 MiB) with /{MODULES}/kernel/virtio_pci.ko.xz"),
])
def test_an_image_kernels_hostile_modules_fail_at_once_in_one_line(hostile_kernel_images,
                                                                   kind, line):
    """100k index lines (26-66 s of CPU before), a chain deeper than Python's stack (a
    RecursionError traceback before), a module bomb (GiBs of memory before, 137 with
    `-m`): each stops before QEMU starts, in a second or two, with its one line and
    nothing killed."""
    started = time.monotonic()
    out = docker_run("dkvm", "-m", "400m", "-e", "DKVM_KERNEL=image",
                     hostile_kernel_images[kind], "true")
    took = time.monotonic() - started
    assert out.returncode not in (0, 137), out
    assert dkvm_lines(out.stderr) and dkvm_lines(out.stderr)[-1].endswith(line), out.stderr
    assert "Traceback" not in out.stderr
    assert took < 30, took


# --- virtiofsd's descriptors -------------------------------------------------------------

@pytest.fixture(scope="module")
def tmp_image(busybox_image):
    """busybox with a /tmp anyone may write, as images have it."""
    name = "dkvm-test-bounds-files"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        busybox_tree(root)
        (root / "tmp").mkdir()
        (root / "tmp").chmod(0o1777)
        docker_import(root, name, [PATH_ENV])
    yield name
    sh("docker", "rmi", "-f", name, check=False)


MAKE_FILES = ("cd /tmp && i=0; while [ $i -lt {count} ]; do echo -n 2>/dev/null >f$i || "
              "{{ echo failed at $i; exit 1; }}; i=$((i + 1)); done; ls | wc -l; "
              "cat /etc/passwd >/dev/null && echo still fine")


@pytest.mark.slow
@pytest.mark.parametrize("user", ["65534", "0"])
def test_a_guest_makes_25000_files_in_tmp_as_under_runc(tmp_image, user):
    """virtiofsd holds a descriptor for each inode the guest's kernel keeps cached; at
    the container's limit (20000 here, which this host's root cannot raise) every new
    file failed with EMFILE. Near it the guest now lets go of the inodes nothing uses:
    25000 files, as nobody and as root, as under runc."""
    script = MAKE_FILES.format(count=25000)
    runc = docker_run("runc", "-u", user, tmp_image, "sh", "-c", script)
    dkvm = docker_run("dkvm", "-u", user, tmp_image, "sh", "-c", script, timeout=600)
    assert (runc.returncode, runc.stdout) == (0, "25000\nstill fine\n"), runc
    assert (dkvm.returncode, dkvm.stdout, dkvm.stderr) == (0, runc.stdout, ""), dkvm


# --- exec relays inside the memory limit ----------------------------------------------

MAX_EXECS = 24              # without a memory limit (schema.MOST_EXECS)
FILLED_LIMIT, FILLED_EXECS = "400m", 6      # vm_size.exec_slots: one per 64 MiB of the limit


def too_many(cap):
    return (f"too many concurrent execs in this container (at most {cap}); this one was not "
            "started")


def start_sleeper(name, *args):
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", name, *args, "dkvm-test-busybox",
       "sh", "-c", "echo ready; sleep 100000")
    wait_until(lambda: "ready" in sh("docker", "logs", name, check=False).stdout,
               "the workload to start", timeout=120)


def exec_in(name, *args, timeout=120):
    return sh("docker", "exec", name, *args, timeout=timeout, check=False)


def refused(result, cap=MAX_EXECS):
    """An exec refused at the cap: runc's status for an exec that did not start, and
    the one line."""
    return result.returncode == 126 and dkvm_lines(result.stderr) == [
        line for line in result.stderr.splitlines() if line] and \
        dkvm_lines(result.stderr)[0].endswith(too_many(cap))


# an exec that marks its start in /marks and ends 0 once the test has put `go` there
HOLD = ("touch /marks/started-$$; for i in $(seq 900); do [ -e /marks/go ] && exit 0; "
        "sleep 0.2; done; exit 1")


@pytest.mark.slow
def test_the_exec_beyond_the_cap_fails_at_once_in_one_line(busybox_image, container_name,
                                                           tmp_path):
    """24 execs at once run; the next is refused at once, saying so (before: the 129th
    was told "the VM stopped", 137); once they end, execs work again. The 24 say when
    they run and end when told, so no exec of the test's takes a slot while they start
    (a loaded host starts 24 execs slowly)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    start_sleeper(container_name, "-v", f"{marks}:/marks")
    try:
        with concurrent.futures.ThreadPoolExecutor(MAX_EXECS) as pool:
            holders = [pool.submit(exec_in, container_name, "sh", "-c", HOLD, timeout=300)
                       for _ in range(MAX_EXECS)]
            try:
                wait_until(lambda: len(list(marks.glob("started-*"))) == MAX_EXECS,
                           "every exec to run", timeout=120)
                for _ in range(2):
                    started = time.monotonic()
                    extra = exec_in(container_name, "true")
                    assert refused(extra), extra
                    assert time.monotonic() - started < 10
            finally:
                (marks / "go").touch()
            results = [future.result() for future in holders]
        assert [r.returncode for r in results] == [0] * MAX_EXECS, results
        assert exec_in(container_name, "echo", "alive").stdout == "alive\n"
    finally:
        sh("docker", "rm", "-f", container_name, check=False)


@pytest.mark.slow
def test_execs_while_the_guest_fills_its_ram_never_take_qemu(busybox_image, container_name):
    """`-m 400m` (room for 6 execs), the guest's RAM filled but for 40 MiB, then twice
    that many execs at once (each lives 15 s): 6 work, the others are refused with
    their one line; QEMU runs on, and the kernel's OOM killer never ran in the
    container (before: OOMKilled, QEMU gone)."""
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, "-m", FILLED_LIMIT,
       "--tmpfs", "/fill:size=1g", "dkvm-test-busybox", "sh", "-c",
       "total=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo); "
       "dd if=/dev/zero of=/fill/x bs=1M count=$((total - 40)) 2>/dev/null; "
       "echo filled $total; sleep 100000")
    try:
        wait_until(lambda: "filled" in sh("docker", "logs", container_name,
                                          check=False).stdout, "the guest to fill its RAM",
                   timeout=180)
        burst = 2 * FILLED_EXECS
        with concurrent.futures.ThreadPoolExecutor(burst) as pool:     # all alive at once
            results = list(pool.map(lambda _: exec_in(container_name, "sh", "-c",
                                                      "echo ok; sleep 15"), range(burst)))
        for result in results:
            assert (result.returncode, result.stdout) == (0, "ok\n") or \
                refused(result, FILLED_EXECS), result
        assert sum(r.returncode == 0 for r in results) >= FILLED_EXECS // 2, results
        state = sh("docker", "inspect", "-f", "{{.State.Running}} {{.State.OOMKilled}}",
                   container_name).stdout.split()
        assert state == ["true", "false"]
        cgroup = Path("/sys/fs/cgroup/memory/docker",
                      sh("docker", "inspect", "-f", "{{.Id}}", container_name).stdout.strip())
        oom = dict(line.split()
                   for line in (cgroup / "memory.oom_control").read_text().splitlines())
        assert oom["oom_kill"] == "0", oom
        assert exec_in(container_name, "echo", "alive").stdout == "alive\n"
        print("max usage MiB", int((cgroup / "memory.max_usage_in_bytes").read_text()) >> 20)
    finally:
        sh("docker", "rm", "-f", container_name, check=False)
