"""`docker exec` runs in the guest, with runc as the oracle."""
import hashlib
import subprocess
import threading

import pexpect
import pytest

from dockerutil import interrupt_foreground_sleep, logs, resize_and_check, sh
from waiting import wait_until

EXEC_TIMEOUT = 180
RUNTIMES = ("runc", "dkvm")


@pytest.fixture(scope="module")
def containers(busybox_image):
    """One long-running container per runtime, alike but for the runtime."""
    names = {rt: f"dkvm-exec-test-{rt}" for rt in RUNTIMES}
    for rt, name in names.items():
        sh("docker", "rm", "-f", name, check=False)
        options = ["-e", "DKVM_ACCEL=tcg"] if rt == "dkvm" else []   # must not leak to execs
        sh("docker", "run", "-d", f"--runtime={rt}", "--name", name, "--hostname", "exechost",
           "-e", "FROM_RUN=yes", *options, "-w", "/srv", busybox_image,
           "sh", "-c", 'mkdir -p /scratch && trap "exit 0" TERM; while :; do sleep 1; done')
    yield names
    for name in names.values():
        sh("docker", "rm", "-f", name, check=False)


def docker_exec(name, flags, cmd, input=None, timeout=EXEC_TIMEOUT):
    return subprocess.run(["docker", "exec", *flags, name, *cmd], capture_output=True,
                          timeout=timeout, input=input)


def both(containers, flags, cmd, input=None):
    return {rt: docker_exec(containers[rt], flags, cmd, input=input) for rt in RUNTIMES}


ORACLE = {
    "identity": ([], ["sh", "-c", "id; pwd; echo $HOME; env | sort"]),
    "user-name-workdir-env": (["-u", "app", "-w", "/", "-e", "EXTRA=1"],
                              ["sh", "-c", "id; pwd; echo $HOME; env | sort"]),
    "user-number-group": (["-u", "1000:2000"], ["id"]),
    "privileged": (["--privileged"], ["id"]),
    "streams-and-exit": ([], ["sh", "-c", "echo out; echo err >&2; exit 5"]),
    "not-found": ([], ["no-such-command"]),
    "not-executable": ([], ["/etc/passwd"]),
    "killed-by-signal": ([], ["sh", "-c", "kill -9 $$"]),
    "missing-workdir": (["-w", "/no/such/dir"], ["pwd"]),
    "sees-workload": ([], ["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo"]),
}


@pytest.mark.parametrize("case", sorted(ORACLE))
def test_exec_matches_runc(containers, case):
    flags, cmd = ORACLE[case]
    out = both(containers, flags, cmd)
    runc, dkvm = out["runc"], out["dkvm"]
    assert (dkvm.returncode, dkvm.stdout, dkvm.stderr) == (runc.returncode, runc.stdout,
                                                           runc.stderr)


def test_exec_runs_in_the_guest(containers, guest_release):
    out = docker_exec(containers["dkvm"], [], ["uname", "-r"])
    assert out.stdout.decode().strip() == guest_release


def test_stdin_100mb_checksum(containers):
    data = subprocess.run(["head", "-c", "100M", "/dev/urandom"], capture_output=True,
                          check=True).stdout
    out = docker_exec(containers["dkvm"], ["-i"], ["sha256sum"], input=data, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split()[0] == hashlib.sha256(data).hexdigest()


def test_stdin_eof_reaches_the_process(containers):
    out = both(containers, ["-i"], ["sh", "-c", "cat; echo after-eof"], input=b"x\ny\n")
    assert out["dkvm"].stdout == out["runc"].stdout == b"x\ny\nafter-eof\n"


def test_detached_exec_keeps_running(containers):
    name = containers["dkvm"]
    sh("docker", "exec", "-d", name, "sh", "-c", "sleep 2; echo done > /scratch/detached")
    wait_until(lambda: docker_exec(name, [], ["cat", "/scratch/detached"]).stdout == b"done\n",
               "the detached exec to finish its work", timeout=60, interval=0.5)


def test_twenty_concurrent_execs_keep_their_streams(containers):
    name, results = containers["dkvm"], {}

    def one(i):
        results[i] = docker_exec(name, [], ["sh", "-c", f"seq 1 {i * 500}; echo err-{i} >&2; "
                                                        f"exit {i}"])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(1, 21)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=EXEC_TIMEOUT + 30)
    for i in range(1, 21):
        out = results[i]
        assert out.returncode == i
        assert out.stdout.decode() == "".join(f"{n}\n" for n in range(1, i * 500 + 1))
        assert out.stderr.decode() == f"err-{i}\n"


def test_exec_with_terminal(containers):
    child = pexpect.spawn("docker", ["exec", "-it", containers["dkvm"], "sh"],
                          dimensions=(25, 90), timeout=EXEC_TIMEOUT, encoding="utf-8")
    try:
        child.expect(r"[#$] ")
        child.sendline("tty; stty size")
        child.expect(r"/dev/pts/\d+")
        child.expect("25 90")
        resize_and_check(child, (25, 90), (33, 111))
        interrupt_foreground_sleep(child, containers["dkvm"])
        child.expect(r"[#$] ")
        child.sendline("exit 9")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 9


def test_exec_while_booting_waits_then_runs(busybox_image, container_name):
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, busybox_image,
       "sleep", "600")
    out = docker_exec(container_name, [], ["echo", "booted"])
    assert (out.returncode, out.stdout) == (0, b"booted\n")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_exec_running_when_the_container_stops_ends_as_with_runc(busybox_image,
                                                                    container_name, runtime):
    """The workload exits under a running exec: the exec is killed with the container
    (137), as runc kills what is left in the container when its init exits."""
    sh("docker", "run", "-d", f"--runtime={runtime}", "--name", container_name, busybox_image,
       "sh", "-c", 'trap "exit 0" TERM; echo ready; sleep 600 & wait')
    wait_until(lambda: "ready" in logs(container_name), "the workload to start")
    running = subprocess.Popen(["docker", "exec", container_name, "sh", "-c",
                                "echo started; exec sleep 600"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        assert running.stdout.readline() == b"started\n"
        sh("docker", "stop", "-t", "30", container_name, timeout=60)
        running.wait(timeout=60)
    finally:
        running.kill()
        running.communicate(timeout=60)
    assert running.returncode == 137
