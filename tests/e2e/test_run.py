"""`docker run --runtime=dkvm` against `--runtime=runc`: same stdout, stderr, exit code."""
import platform

import pytest

from dockerutil import docker_run, sh
from waiting import poll

ORACLE_CASES = {
    "id": ["id"],
    "id-user-name": ["-u", "app", "id"],
    "id-user-number-group": ["-u", "1000:2000", "id"],
    "id-group-add": ["-u", "app", "--group-add", "extra", "id"],
    "pwd-workdir-created": ["-w", "/srv/new/dir", "pwd"],
    "pwd-default": ["pwd"],
    "env-sorted": ["-e", "FOO=bar", "-e", "EMPTY=", "--hostname", "h1", "-u", "app",
                   "sh", "-c", "env | sort"],
    "hostname": ["--hostname", "vm-host-1", "hostname"],
    "entrypoint-args": ["--entrypoint", "/bin/sh", "-u", "1000", "-w", "/tmp",
                        "-e", "X=1", "--hostname", "h2", "-c", 'echo "$0" "$@" "$X" "$(pwd)"',
                        "zero", "one", "two three"],
    "stderr-and-exit": ["sh", "-c", "echo out; echo err >&2; exit 3"],
    "domainname-sysctl": ["--hostname", "h4", "--domainname", "example.org", "--sysctl",
                          "net.ipv4.ip_forward=1", "sh", "-c",
                          "hostname; cat /proc/sys/kernel/domainname /proc/sys/net/ipv4/ip_forward"],
}


def assert_same(runc, dkvm):
    assert (dkvm.returncode, dkvm.stdout, dkvm.stderr) == (runc.returncode, runc.stdout, runc.stderr)


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_matches_runc(busybox_image, case):
    args = ORACLE_CASES[case]
    flags, rest = split_flags(args)
    runc = docker_run("runc", *flags, busybox_image, *rest)
    dkvm = docker_run("dkvm", *flags, busybox_image, *rest)
    assert_same(runc, dkvm)


def split_flags(args):
    """docker run flags come before the image, the command after it."""
    flags, i = [], 0
    takes_value = {"-u", "-w", "-e", "--hostname", "--entrypoint", "--group-add", "--env-file",
                   "--domainname", "--sysctl"}
    while i < len(args) and args[i].startswith("-"):
        flags.append(args[i])
        if args[i] in takes_value:
            flags.append(args[i + 1])
            i += 1
        i += 1
    return flags, args[i:]


def test_env_file_matches_runc(busybox_image, tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("ALPHA=1\nBETA=two words\n# comment\nGAMMA=\n")
    args = ["--env-file", str(env_file), "--hostname", "h3", busybox_image, "sh", "-c", "env | sort"]
    assert_same(docker_run("runc", *args), docker_run("dkvm", *args))


def test_guest_kernel_is_not_the_host_kernel(busybox_image, guest_release):
    out = docker_run("dkvm", busybox_image, "uname", "-r")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == guest_release
    assert guest_release != platform.release()
    assert out.stderr == ""


def test_static_binary_image_without_shell_or_libc(static_image, guest_release):
    out = docker_run("dkvm", static_image, "a", "b c")
    assert (out.returncode, out.stdout, out.stderr) == (7, f"{guest_release}\narg:a\narg:b c\n", "")


def test_debian_image(debian_image, guest_release):
    script = "id -un; uname -r; cat /etc/debian_version >/dev/null && echo debian; echo $HOME"
    out = docker_run("dkvm", "-u", "nobody", debian_image, "bash", "-c", script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["nobody", guest_release, "debian", "/nonexistent"]
    runc = docker_run("runc", "--hostname", "d", debian_image, "bash", "-c", "env | sort")
    dkvm = docker_run("dkvm", "--hostname", "d", debian_image, "bash", "-c", "env | sort")
    assert_same(runc, dkvm)


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_code(busybox_image, code):
    out = docker_run("dkvm", busybox_image, "sh", "-c", f"exit {code}")
    assert out.returncode == code


@pytest.mark.parametrize("sig", [9, 15])
def test_killed_by_signal_is_128_plus_n(busybox_image, sig):
    """With --init the shell is not PID 1, so a signal ends it, under runc and dkvm."""
    args = ["--init", busybox_image, "sh", "-c", f"kill -{sig} $$"]
    runc, dkvm = docker_run("runc", *args), docker_run("dkvm", *args)
    assert runc.returncode == 128 + sig
    assert_same(runc, dkvm)


def test_workload_is_pid_1_like_runc(busybox_image):
    """Without --init the workload is PID 1 of its own namespace: SIGKILL from inside
    is ignored, as under runc, and ps shows only its own processes."""
    args = [busybox_image, "sh", "-c", "kill -9 $$; echo alive; ps -o pid,comm"]
    assert_same(docker_run("runc", *args), docker_run("dkvm", *args))


def test_init_reaps_zombies(busybox_image):
    """An orphan that exits is reaped by --init's tini: its /proc entry goes (a zombie
    would keep it). Polled in the workload, bounded at 10 s."""
    script = ("orphan=$(sh -c 'sleep 0.2 >/dev/null & echo $!'); i=0; "
              "while [ -e /proc/$orphan ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done; "
              "[ -e /proc/$orphan ] && echo zombie || echo reaped")
    args = ["--init", busybox_image, "sh", "-c", script]
    runc, dkvm = docker_run("runc", *args), docker_run("dkvm", *args)
    assert (dkvm.returncode, dkvm.stdout) == (runc.returncode, runc.stdout) == (0, "reaped\n"), \
        dkvm.stderr


def test_stdout_and_stderr_stay_apart(busybox_image):
    out = docker_run("dkvm", busybox_image, "sh", "-c", "echo out1; echo err1 >&2; echo out2")
    assert (out.stdout, out.stderr) == ("out1\nout2\n", "err1\n")


def test_logs_keep_streams_apart(busybox_image, container_name):
    run = sh("docker", "run", "--runtime=dkvm", "--name", container_name, busybox_image,
             "sh", "-c", "echo to-out; echo to-err >&2", check=False)
    assert run.returncode == 0, run.stderr
    logs = sh("docker", "logs", container_name)
    assert (logs.stdout, logs.stderr) == ("to-out\n", "to-err\n")


def test_output_complete_and_in_order(busybox_image):
    args = [busybox_image, "sh", "-c", "seq 1 30000; echo last-line-before-exit; exit 5"]
    runc, dkvm = docker_run("runc", *args), docker_run("dkvm", *args)
    assert dkvm.returncode == 5
    assert dkvm.stdout == runc.stdout
    assert dkvm.stderr == ""


def test_command_not_found(busybox_image):
    out = docker_run("dkvm", busybox_image, "no-such-command")
    assert out.returncode == 127
    assert "no-such-command" in out.stderr and "not found" in out.stderr


def test_cpus_and_memory(busybox_image):
    out = docker_run("dkvm", "--cpus", "2", "-m", "512m", busybox_image, "sh", "-c",
                     "nproc; grep MemTotal /proc/meminfo")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "2"
    mem_kib = int(lines[1].split()[1])
    # guest RAM is what QEMU (and under TCG its translation cache) leave of the limit
    assert 300 * 1024 < mem_kib <= (512 - 80 - 64) * 1024


def test_one_vcpu(busybox_image):
    out = docker_run("dkvm", "--cpus", "1", busybox_image, "nproc")
    assert out.stdout.strip() == "1", out.stderr


def test_volumes_bind_mounts_and_tmpfs(busybox_image, tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "given").write_text("from-host\n")
    script = ("echo from-guest > /rw/made; cat /ro/given; "
              "touch /ro/nope 2>/dev/null && echo ro-writable; "
              "grep ' /scratch ' /proc/mounts | cut -d' ' -f3; echo x > /scratch/f && cat /scratch/f")
    out = docker_run("dkvm", "-v", f"{rw}:/rw", "-v", f"{ro}:/ro:ro", "--tmpfs", "/scratch",
                     busybox_image, "sh", "-c", script)
    assert (out.returncode, out.stdout) == (0, "from-host\ntmpfs\nx\n"), out.stderr
    assert (rw / "made").read_text() == "from-guest\n"
    assert not (ro / "nope").exists()


def test_changes_from_outside_show_in_a_running_vm(busybox_image, container_name, tmp_path):
    """What `docker cp` writes, and what another container writes into a shared volume,
    the running VM reads back: files it had read (and cached) before included."""
    volume = f"{container_name}-vol"
    sh("docker", "volume", "rm", "-f", volume, check=False)
    (tmp_path / "f").write_text("from docker cp, longer than before\n")
    try:
        sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, "-v",
           f"{volume}:/shared", busybox_image, "sleep", "600")
        sh("docker", "exec", container_name, "sh", "-c",
           "echo old > /f && cat /f && echo old > /shared/g && cat /shared/g")
        sh("docker", "cp", str(tmp_path / "f"), f"{container_name}:/f")
        docker_run("runc", "-v", f"{volume}:/shared", busybox_image, "sh", "-c",
                   "echo written by a runc peer > /shared/g")
        expected = "from docker cp, longer than before\nwritten by a runc peer\n"
        seen = poll(lambda: sh("docker", "exec", container_name, "cat", "/f", "/shared/g").stdout,
                    lambda text: text == expected, timeout=10, interval=0.5)
        assert seen == expected
    finally:
        sh("docker", "rm", "-f", container_name, check=False)
        sh("docker", "volume", "rm", "-f", volume, check=False)


def test_named_volume(busybox_image):
    name = "dkvm-test-volume"
    sh("docker", "volume", "rm", "-f", name, check=False)
    try:
        write = docker_run("dkvm", "-v", f"{name}:/data", busybox_image, "sh", "-c",
                           "echo kept > /data/f")
        assert write.returncode == 0, write.stderr
        read = docker_run("runc", "-v", f"{name}:/data", busybox_image, "cat", "/data/f")
        assert read.stdout == "kept\n"
    finally:
        sh("docker", "volume", "rm", "-f", name, check=False)
