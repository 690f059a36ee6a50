"""stdin, terminals and docker stop, with runc as the oracle."""

import pexpect
import pytest

from dockerutil import docker_run, logs, resize_and_check, sh
from waiting import wait_until

PROMPT_TIMEOUT = 90


@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_stdin_with_i_reaches_workload_and_eof_follows(busybox_image, runtime):
    out = docker_run(runtime, "-i", busybox_image, "sh", "-c", "cat; echo done",
                     input="a\nb\n")
    assert (out.returncode, out.stdout, out.stderr) == (0, "a\nb\ndone\n", "")


def test_without_i_stdin_is_empty_like_runc(busybox_image):
    args = [busybox_image, "sh", "-c", "cat; echo after-eof"]
    runc, dkvm = docker_run("runc", *args), docker_run("dkvm", *args)
    assert (dkvm.returncode, dkvm.stdout) == (runc.returncode, runc.stdout) == (0, "after-eof\n")


@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_docker_stop_delivers_sigterm_to_a_trap(busybox_image, container_name, runtime):
    script = 'trap "echo got-term; exit 7" TERM; echo ready; while :; do sleep 0.1; done'
    sh("docker", "run", "-d", f"--runtime={runtime}", "--name", container_name, busybox_image,
       "sh", "-c", script)
    wait_until(lambda: "ready" in logs(container_name), "the workload to start")
    sh("docker", "stop", "-t", "30", container_name, timeout=60)
    code = sh("docker", "wait", container_name, timeout=60).stdout.strip()
    assert code == "7"
    assert sh("docker", "logs", container_name).stdout == "ready\ngot-term\n"


def test_interactive_shell_with_terminal(busybox_image):
    child = pexpect.spawn("docker", ["run", "--rm", "-it", "--runtime=dkvm", busybox_image, "sh"],
                          dimensions=(30, 100), timeout=PROMPT_TIMEOUT, encoding="utf-8")
    try:
        child.expect(r"[#$] ")
        child.sendline("echo result-$((6*7))")
        child.expect("result-42")
        child.sendline("stty size")
        child.expect("30 100")
        resize_and_check(child, (30, 100), (40, 120))
        child.sendline("exit 4")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 4
