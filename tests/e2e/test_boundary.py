"""The VM is the boundary: a hostile image, or a guest with root, runs its code only
under the guest's kernel; the container side never loads, follows or trusts anything
of the image's or the guest's.

The hostile images carry a library (images/evil.c) that announces, wherever a loader
maps it, the kernel it runs under, on the container's stderr: runc shows that the
announcement works (the host's kernel: runc's container is the boundary), DKVM must
show the guest's only."""
import platform
import shutil
import tempfile
from pathlib import Path

import pytest

from dockerutil import PATH_ENV, busybox_tree, docker_import, image_exists, sh
from waiting import wait_until

HERE = Path(__file__).resolve().parent
HOSTILE = "dkvm-test-hostile"       # + -preload, -env, -latent


def evil_kernels(text):
    """The kernels the hostile library announced itself under."""
    return [word.split("=", 1)[1] for line in text.splitlines() if line.startswith("EVIL ")
            for word in line.split() if word.startswith("kernel=")]


@pytest.fixture(scope="module")
def hostile_images(busybox_image):
    """busybox, a dynamic /hello with the host's libc, /evil.so; three ways to load
    it: /etc/ld.so.preload, LD_PRELOAD in the image's ENV, or nothing yet (the guest
    writes ld.so.preload itself)."""
    names = {kind: f"{HOSTILE}-{kind}" for kind in ("preload", "env", "latent")}
    if all(image_exists(name) for name in names.values()):
        return names
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        busybox_tree(root)
        sh("gcc", "-O2", "-o", str(root / "hello"), str(HERE / "images" / "hello.c"))
        sh("gcc", "-O2", "-shared", "-fPIC", "-o", str(root / "evil.so"),
           str(HERE / "images" / "evil.c"))
        for line in sh("ldd", str(root / "hello")).stdout.splitlines():
            path = next((word for word in line.split() if word.startswith("/")), None)
            if path:
                (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, root / path.lstrip("/"))
        docker_import(root, names["latent"], [PATH_ENV])
        docker_import(root, names["env"], [PATH_ENV, "ENV LD_PRELOAD=/evil.so"])
        (root / "etc" / "ld.so.preload").write_text("/evil.so\n")
        docker_import(root, names["preload"], [PATH_ENV])
    return names


@pytest.mark.parametrize("kind", ["preload", "env"])
def test_a_hostile_images_library_runs_only_under_the_guests_kernel(hostile_images,
                                                                    guest_release, kind):
    image = hostile_images[kind]
    runc = sh("docker", "run", "--rm", "--runtime=runc", image, "/hello")
    assert evil_kernels(runc.stderr) == [platform.release()]       # it works, on the host
    dkvm = sh("docker", "run", "--rm", "--runtime=dkvm", image, "/hello")
    assert dkvm.stdout == guest_release + "\n"
    assert evil_kernels(dkvm.stderr) == [guest_release], dkvm.stderr


def test_ld_so_preload_written_by_the_guest_reaches_no_exec_relay_nor_a_restart(
        hostile_images, guest_release, container_name):
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name,
       hostile_images["latent"], "sleep", "600")
    sh("docker", "exec", container_name, "sh", "-c", "echo /evil.so > /etc/ld.so.preload")
    first = sh("docker", "exec", container_name, "/hello")
    sh("docker", "restart", "-t", "1", container_name, timeout=180)
    second = sh("docker", "exec", container_name, "/hello")
    assert first.stdout == second.stdout == guest_release + "\n"
    announced = evil_kernels(first.stderr + second.stderr +
                             sh("docker", "logs", container_name).stderr)
    assert announced and set(announced) == {guest_release}


def test_the_guest_reaches_none_of_the_container_sides_files(busybox_image, container_name):
    """Not at /.dkvm, nor by mounting the export again as root in the guest: the
    sockets, logs and plan are the container side's own; the payload it can see is
    read-only. And the container side goes on serving execs whatever the guest did."""
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, busybox_image,
       "sleep", "600")
    out = sh("docker", "exec", container_name, "sh", "-c",
             "ls -a /; ls /.dkvm 2>/dev/null && echo PAYLOAD-AT-ROOT; "
             "mkdir -p /mnt/x && mount -t virtiofs root /mnt/x && ls /mnt/x; "
             "find / -xdev \\( -name '*.sock' -o -name console.log -o -name qemu.log \\) "
             "2>/dev/null; find /mnt/x -name '*.sock' 2>/dev/null; "
             "touch /mnt/x/dkvm/x 2>&1; rm -rf /mnt/x/dkvm/qemu 2>&1 | head -1").stdout
    assert ".dkvm" not in out.split() and "PAYLOAD-AT-ROOT" not in out
    assert "dkvm\nrootfs\n" in out                     # what the export holds
    assert ".sock" not in out and ".log" not in out
    assert out.count("Read-only file system") == 2
    assert sh("docker", "exec", container_name, "echo", "still served").stdout == \
        "still served\n"


def test_docker_diff_shows_what_runc_shows(busybox_image, container_name):
    diffs = {}
    for runtime in ("runc", "dkvm"):
        name = f"{container_name}-{runtime}"
        try:
            sh("docker", "run", "--runtime=" + runtime, "--name", name, busybox_image, "sh",
               "-c", "mkdir /made && echo x > /made/file")
            diffs[runtime] = sh("docker", "diff", name).stdout
        finally:
            sh("docker", "rm", "-f", name, check=False)
    assert diffs["dkvm"] == diffs["runc"] == "A /made\nA /made/file\n"


@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_read_only_root_as_under_runc(busybox_image, runtime):
    out = sh("docker", "run", "--rm", "--read-only", "--tmpfs", "/scratch", "-v",
             "/tmp:/hosttmp:ro", f"--runtime={runtime}", busybox_image, "sh", "-c",
             "touch /x 2>&1; echo root=$?; touch /scratch/x; echo tmpfs=$?; "
             "grep -c ' / .*\\bro\\b' /proc/mounts", check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "touch: /x: Read-only file system\nroot=1\ntmpfs=0\n1\n"


@pytest.mark.slow
def test_a_dns_flood_from_an_unprivileged_guest_process_leaves_the_container_serving(
        debian_image, container_name):
    """Malformed queries to Docker's DNS address, as fast as bash sends them, as
    nobody: the container stays up, names still resolve, and the container side's
    memory stays bounded."""
    network, peer = f"{container_name}-net", f"{container_name}-peer"
    sh("docker", "network", "create", network)
    try:
        sh("docker", "run", "-d", "--runtime=runc", "--network", network, "--name", peer,
           debian_image, "sleep", "600")
        sh("docker", "run", "-d", "--runtime=dkvm", "--network", network, "--name",
           container_name, debian_image, "sleep", "600")
        flood = sh("docker", "exec", "-u", "65534", container_name, "bash", "-c",
                   "exec 3<>/dev/udp/127.0.0.11/53; end=$((SECONDS + 12)); n=0; "
                   "while [ $SECONDS -lt $end ]; do echo garbage >&3; n=$((n + 1)); done; "
                   "echo $n", timeout=120)
        assert int(flood.stdout) > 1024, flood.stdout     # more than select() could hold
        assert sh("docker", "inspect", "-f", "{{.State.Running}}", container_name
                  ).stdout.strip() == "true"
        resolved = wait_until(lambda: sh("docker", "exec", container_name, "getent", "hosts",
                                         peer, check=False).stdout,
                              "the peer's name to resolve again", timeout=30)
        assert peer in resolved
        pid = sh("docker", "inspect", "-f", "{{.State.Pid}}", container_name).stdout.strip()
        rss_kib = int(next(line.split()[1] for line in open(f"/proc/{pid}/status")
                           if line.startswith("VmRSS:")))
        assert rss_kib < 150 << 10, f"the entrypoint holds {rss_kib} KiB"
    finally:
        sh("docker", "rm", "-f", peer, container_name, check=False)
        sh("docker", "network", "rm", network, check=False)
