"""VM templates (host.templates, container.restore): a container's VM restored from a
VM booted once and saved, with runc as the oracle for what the user sees.

How a VM started shows in its kernel's command line: a cold boot's roots the kernel in
the container's export (`rootfstype=virtiofs`); a restored VM's is the template's,
which has no root of its own (the export is hot-plugged after the restore). Each test
that needs a template of its own takes a memory limit no other test uses, so that its
machine (and template) is new to it."""
import concurrent.futures
import glob
import json
import os
import shutil
import time
from pathlib import Path

import pexpect
import pytest

from dkvm.host.vm_size import split_limit
from dockerutil import HTTPD, RUN_TIMEOUT, docker_run, http_get, load_into_engine, sh

TEMPLATES = "/var/lib/dkvm/*/templates"      # every build's (paths.TEMPLATES_DIR)
COLD_MARK = "rootfstype=virtiofs"            # only a cold boot's command line has it
SEP = "--- end of /proc/cmdline ---"
# the workload whose output and exit code are compared with runc's
SCRIPT = "echo hi; cat /etc/hostname; echo err >&2; exit 3"
EXPECTED = (3, "hi\ntmpl-host\n", "err\n")
HOSTNAME = ["--hostname", "tmpl-host"]


def template_dirs(limit_mib):
    """The template directories (of any build) for the VM of a container run with
    `-m {limit_mib}m` (its guest RAM is what the limit leaves: host.vm_size)."""
    found = []
    for accel in ("tcg", "kvm"):
        guest = split_limit(limit_mib, accel)[0]
        found += glob.glob(f"{TEMPLATES}/*-{accel}-*cpu-{guest}m")
    return sorted(found)


def remove_templates(limit_mib):
    for path in template_dirs(limit_mib):
        if os.path.islink(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)


def makings_left():
    return glob.glob(f"{TEMPLATES}/.making-*")


def boot_kind(cmdline):
    return "cold" if COLD_MARK in cmdline else "restored" if cmdline.strip() else "unknown"


def run_reporting_boot(runtime, *args, script=SCRIPT, timeout=RUN_TIMEOUT):
    """`docker run ... sh -c SCRIPT` printing the kernel's command line first: (how the
    VM started, (exit code, stdout less the command line, stderr)). Under runc the
    command line is the host's: only the run is meaningful."""
    out = docker_run(runtime, *args, "sh", "-c", f"cat /proc/cmdline; echo '{SEP}'; {script}",
                     timeout=timeout)
    cmdline, found, rest = out.stdout.partition(SEP + "\n")
    if not found:
        return "unknown", (out.returncode, out.stdout, out.stderr)
    return boot_kind(cmdline), (out.returncode, rest, out.stderr)


def test_a_new_machine_boots_cold_once_then_restores_from_the_template_it_left(busybox_image):
    remove_templates(777)
    args = ["-m", "777m", *HOSTNAME, busybox_image]
    first = run_reporting_boot("dkvm", *args)
    assert first == ("cold", EXPECTED)
    assert len(template_dirs(777)) == 1, "the first run's create leaves the template"
    runc = run_reporting_boot("runc", *args)[1]
    assert runc == EXPECTED
    assert run_reporting_boot("dkvm", *args) == ("restored", runc)
    exits = {runtime: run_reporting_boot(runtime, *args, script="exit 42")[1]
             for runtime in ("runc", "dkvm")}
    assert exits["dkvm"] == exits["runc"] == (42, "", "")


def test_restored_containers_share_no_random_state_boot_id_or_clock(busybox_image):
    """Every VM of a machine restores the same saved RAM: the guest reseeds its RNG and
    sets its clock from its plan, and boot_id is made after the restore."""
    docker_run("dkvm", busybox_image, "true")       # the default machine's template made
    script = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
              "cat /proc/sys/kernel/random/boot_id; date +%s")
    seen = []
    for _ in range(2):
        before = time.time()
        kind, (code, out, err) = run_reporting_boot("dkvm", busybox_image, script=script)
        after = time.time()
        assert (kind, code, err) == ("restored", 0, ""), out
        random, boot_id, clock = out.split()
        assert len(random) == 64 and len(boot_id) == 36
        assert before - 3 <= int(clock) <= after + 3, (before, clock, after)
        seen.append((random, boot_id))
    (random_a, boot_id_a), (random_b, boot_id_b) = seen
    assert random_a != random_b
    assert boot_id_a != boot_id_b


def test_debians_kernel_restores_from_a_template_of_its_own(busybox_image):
    """Its template's initramfs is its own (its modules) then DKVM's: a restored VM
    says so in its kernel log, where vmgenid's change reseeded the RNG."""
    args = ["-e", "DKVM_KERNEL=debian", *HOSTNAME, busybox_image]
    docker_run("dkvm", *args, "true")               # its template made, if it was not
    script = "dmesg | grep -c 'virtual machine fork' >&2; " + SCRIPT
    code, out, err = run_reporting_boot("dkvm", *args, script=script)[1]
    assert (code, out, err) == (3, "hi\ntmpl-host\n", "1\nerr\n")
    assert run_reporting_boot("runc", *HOSTNAME, busybox_image)[1] == EXPECTED


def test_template_0_boots_cold_with_the_same_output(busybox_image):
    args = [*HOSTNAME, busybox_image]
    assert run_reporting_boot("dkvm", "-e", "DKVM_TEMPLATE=0", *args) == ("cold", EXPECTED)


def flip_state_bytes(directory, _elsewhere):
    """The device state changed, its size kept: only its hash tells."""
    path = directory / "state"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(byte ^ 0xFF for byte in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def grow_ram(directory, _elsewhere):
    with open(directory / "ram", "r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size + (1 << 20))


def lie_in_manifest(directory, _elsewhere):
    """The manifest says another machine's memory (the RAM file as it was)."""
    manifest = json.loads((directory / "template.json").read_text())
    manifest["memory_mib"] += 64
    (directory / "template.json").write_text(json.dumps(manifest))


def link_elsewhere(directory, elsewhere):
    """The template's directory a link to a sound template elsewhere."""
    os.rename(directory, elsewhere / "real")
    os.symlink(elsewhere / "real", directory)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [flip_state_bytes, grow_ram, lie_in_manifest, link_elsewhere])
def test_a_damaged_template_is_refused_and_made_again(busybox_image, tmp_path, damage):
    """The run after the damage boots cold (its create refuses the template and makes
    it again), with the right output; the run after that is restored."""
    args = ["-m", "666m", *HOSTNAME, busybox_image]
    if len(template_dirs(666)) != 1:
        remove_templates(666)
        assert run_reporting_boot("dkvm", *args) == ("cold", EXPECTED)
    (directory,) = map(Path, template_dirs(666))
    damage(directory, tmp_path)
    assert run_reporting_boot("dkvm", *args) == ("cold", EXPECTED)
    assert directory.is_dir() and not directory.is_symlink()
    assert sorted(os.listdir(directory)) == ["ram", "state", "template.json"]
    if damage is link_elsewhere:        # the link's target was left alone
        assert sorted(os.listdir(tmp_path / "real")) == ["ram", "state", "template.json"]
    assert run_reporting_boot("dkvm", *args) == ("restored", EXPECTED)
    assert makings_left() == []


@pytest.mark.slow
def test_eight_first_runs_at_once_all_succeed_and_make_one_template(busybox_image):
    remove_templates(555)
    args = ["-m", "555m", *HOSTNAME, busybox_image]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        runs = list(pool.map(lambda _: run_reporting_boot("dkvm", *args, timeout=400),
                             range(8)))
    assert [run for _, run in runs] == [EXPECTED] * 8
    assert {kind for kind, _ in runs} <= {"cold", "restored"}
    assert len(template_dirs(555)) == 1
    assert makings_left() == []
    assert run_reporting_boot("dkvm", *args) == ("restored", EXPECTED)


def test_a_restored_vm_serves_a_terminal(busybox_image):
    docker_run("dkvm", busybox_image, "true")       # the default machine's template made
    child = pexpect.spawn("docker", ["run", "--rm", "-it", "--runtime=dkvm", busybox_image, "sh"],
                          dimensions=(30, 100), timeout=90, encoding="utf-8")
    try:
        child.expect(r"[#$] ")
        child.sendline(f"echo cold-marks-$(grep -c {COLD_MARK} /proc/cmdline)")
        child.expect("cold-marks-0")
        child.sendline("stty size")
        child.expect("30 100")
        child.sendline("exit 4")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 4


PUBLISHED = {"runc": 18094, "dkvm": 18095}


@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_a_restored_vm_takes_execs_and_serves_a_published_port(busybox_image, container_name,
                                                                runtime):
    if runtime == "dkvm":
        docker_run(runtime, busybox_image, "true")  # the default machine's template made
    sh("docker", "run", "-d", f"--runtime={runtime}", "--name", container_name,
       "-p", f"127.0.0.1:{PUBLISHED[runtime]}:8080", busybox_image,
       "sh", "-c", HTTPD.format(text=f"page-{runtime}"))
    assert http_get("127.0.0.1", timeout=120, port=PUBLISHED[runtime]) == f"page-{runtime}"
    out = sh("docker", "exec", container_name, "sh", "-c", "echo in-exec; exit 5", check=False)
    assert (out.returncode, out.stdout, out.stderr) == (5, "in-exec\n", "")
    if runtime == "dkvm":
        cmdline = sh("docker", "exec", container_name, "cat", "/proc/cmdline").stdout
        assert boot_kind(cmdline) == "restored", cmdline


def test_a_restored_vm_without_a_network_has_only_loopback(busybox_image):
    script = "ls /sys/class/net"
    runc = run_reporting_boot("runc", "--network", "none", busybox_image, script=script)[1]
    dkvm = run_reporting_boot("dkvm", "--network", "none", busybox_image, script=script)
    assert dkvm == ("restored", runc) and runc == (0, "lo\n", "")


NETS = ("dkvm-test-tmpl-a", "dkvm-test-tmpl-b")


@pytest.fixture
def two_networks(docker):
    for name in NETS:
        sh("docker", "network", "rm", name, check=False)
        sh("docker", "network", "create", name)
    yield NETS
    for name in NETS:
        sh("docker", "network", "rm", name, check=False)


@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_a_restored_vm_on_two_networks_has_both(busybox_image, two_networks, container_name,
                                                runtime):
    sh("docker", "create", f"--runtime={runtime}", "--name", container_name, "--network",
       two_networks[0], busybox_image, "sh", "-c",
       f"grep -c {COLD_MARK} /proc/cmdline; ls /sys/class/net; ip -4 -o addr | wc -l")
    sh("docker", "network", "connect", two_networks[1], container_name)
    out = sh("docker", "start", "-a", container_name, timeout=RUN_TIMEOUT, check=False)
    # 0 marks of a cold boot (restored; runc: the host's command line), eth0, eth1, lo, 3 addresses
    assert (out.returncode, out.stdout.split()) == (0, ["0", "eth0", "eth1", "lo", "3"]), \
        out.stderr


# Podman's default ulimits fail here even under runc (no CAP_SYS_RESOURCE: test_podman)
PODMAN_RUN = ["run", "--rm", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
PODMAN_RUNTIMES = {"runc": [], "dkvm": ["--runtime", "dkvm"]}


@pytest.mark.slow
def test_podman_runs_restored_as_runc(podman_image):
    def podman(runtime, *args):
        return sh("podman", *PODMAN_RUNTIMES[runtime], *PODMAN_RUN, *args, check=False)
    podman("dkvm", podman_image, "true")        # the machine's template made
    outs = {}
    for runtime in PODMAN_RUNTIMES:
        out = podman(runtime, *HOSTNAME, podman_image, "sh", "-c",
                     f"grep -c {COLD_MARK} /proc/cmdline; {SCRIPT}")
        outs[runtime] = (out.returncode, out.stdout, out.stderr)
    assert outs["dkvm"] == outs["runc"]
    assert outs["runc"][0] == 3 and outs["runc"][1].split("\n")[:2] == ["0", "hi"]


# dockerd's containerd, and a namespace of the tests' own (as test_containerd)
CTR = ["ctr", "--address", "/var/run/docker/containerd/containerd.sock",
       "--namespace", "dkvm-test"]
CTR_IMAGE = "docker.io/library/dkvm-test-busybox:latest"


@pytest.mark.slow
def test_ctr_runs_restored_as_runc(busybox_image):
    if not shutil.which("ctr"):
        pytest.skip("no ctr on this host")
    load_into_engine(busybox_image, [*CTR, "images", "import", "-"])
    outs = {}
    for runtime in ("runc", "dkvm", "dkvm"):        # the first dkvm run makes the template
        binary = shutil.which("runc") if runtime == "runc" else "/usr/local/bin/dkvm-runtime"
        out = sh(*CTR, "run", "--rm", "--runc-binary", binary, CTR_IMAGE,
                 f"dkvm-test-tmpl-{runtime}", "sh", "-c",
                 f"grep -c {COLD_MARK} /proc/cmdline; echo out; exit 3", check=False)
        outs[runtime] = (out.returncode, out.stdout, out.stderr)
    assert outs["dkvm"] == outs["runc"] == (3, "0\nout\n", "")

