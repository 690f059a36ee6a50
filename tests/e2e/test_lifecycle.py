"""Lifecycle: kill, stop timeout, restart, pause, rm -f, faults, leaks; runc as the oracle."""
import hashlib
import os
import subprocess
import time

import pexpect
import pytest

from dockerutil import (docker_run, host_vm_processes, interrupt_foreground_sleep,
                        leak_snapshot, logs, sh)
from waiting import wait_until, wait_until_steady

BOOT_TIMEOUT = 120


def run_detached(runtime, name, image, *cmd, flags=()):
    sh("docker", "run", "-d", f"--runtime={runtime}", "--name", name, *flags, image, *cmd)


def state(name):
    return sh("docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name,
              check=False).stdout.split()


TRAP_ALL = ('for s in USR1 HUP INT TERM; do trap "echo got-$s" $s; done; echo ready; '
            'while :; do sleep 0.1; done')


@pytest.mark.parametrize("runtime", ["runc", "dkvm"])
def test_docker_kill_signals_reach_the_workload(busybox_image, container_name, runtime):
    run_detached(runtime, container_name, busybox_image, "sh", "-c", TRAP_ALL)
    wait_until(lambda: "ready" in logs(container_name), "the workload to start")
    for sig in ("USR1", "HUP", "INT", "TERM"):
        sh("docker", "kill", "-s", sig, container_name)
        wait_until(lambda: f"got-{sig}" in logs(container_name), f"the workload to see {sig}",
                 timeout=30)
    start = time.monotonic()
    sh("docker", "kill", container_name)
    assert sh("docker", "wait", container_name, timeout=60).stdout.strip() == "137"
    assert time.monotonic() - start < 10


def test_stop_timeout_ends_a_workload_that_ignores_term(busybox_image, container_name):
    run_detached("dkvm", container_name, busybox_image, "sh", "-c",
                 'trap "" TERM; echo ready; while :; do sleep 0.1; done')
    wait_until(lambda: "ready" in logs(container_name), "the workload to start")
    start = time.monotonic()
    sh("docker", "stop", "-t", "3", container_name, timeout=60)
    elapsed = time.monotonic() - start
    assert state(container_name) == ["exited", "137"]
    assert 3 <= elapsed < 15


def test_restart(busybox_image, container_name):
    run_detached("dkvm", container_name, busybox_image, "sh", "-c",
                 'trap "exit 0" TERM; echo started; while :; do sleep 0.1; done')
    wait_until(lambda: "started" in logs(container_name), "the first start")
    sh("docker", "restart", "-t", "10", container_name, timeout=120)
    wait_until(lambda: logs(container_name).count("started") == 2, "the second start")
    assert state(container_name)[0] == "running"


def test_pause_freezes_and_unpause_resumes_with_the_clock_recovered(busybox_image,
                                                                     container_name):
    run_detached("dkvm", container_name, busybox_image, "sh", "-c",
                 "while :; do date +%s; sleep 0.2; done")
    wait_until(lambda: logs(container_name).strip(), "the first tick")
    sh("docker", "pause", container_name)
    frozen = wait_until_steady(lambda: len(logs(container_name).split()),
                               "output in flight to land")
    # watched for 3 s: nothing runs while paused
    assert wait_until_steady(lambda: len(logs(container_name).split()), "the paused output",
                             settle=3, timeout=10) == frozen
    sh("docker", "unpause", container_name)

    def caught_up():
        ticks = logs(container_name).split()
        return len(ticks) > frozen and abs(int(ticks[-1]) - time.time()) <= 2
    wait_until(caught_up, "the guest clock to catch up after unpause", timeout=30)


def test_rm_force_while_booting_leaves_nothing(busybox_image, container_name):
    """`rm -f` once QEMU runs, while the guest boots (seconds under TCG): QEMU and
    virtiofsd go with the container."""
    before = set(host_vm_processes())
    run_detached("dkvm", container_name, busybox_image, "sh", "-c", "echo started; sleep 100")
    pid = sh("docker", "inspect", "-f", "{{.State.Pid}}", container_name).stdout.strip()
    qemu = wait_until(lambda: sh("pgrep", "-P", pid, "-f", "qemu-system-x86_64",
                               check=False).stdout.split(), "QEMU to start", timeout=60)
    sh("docker", "rm", "-f", container_name, timeout=60)
    assert sh("docker", "inspect", container_name, check=False).returncode != 0
    wait_until(lambda: set(host_vm_processes()) <= before and not set(qemu) & set(
        host_vm_processes()), "QEMU and virtiofsd to be gone", timeout=30)


@pytest.mark.slow
def test_big_output_complete_and_in_order(busybox_image):
    cmd = [busybox_image, "seq", "1", "6500000"]   # about 51 MB
    runc = subprocess.run(["docker", "run", "--rm", "--runtime=runc", *cmd],
                          capture_output=True, timeout=600)
    dkvm = subprocess.run(["docker", "run", "--rm", "--runtime=dkvm", *cmd],
                          capture_output=True, timeout=600)
    assert len(runc.stdout) > 50_000_000
    assert hashlib.sha256(dkvm.stdout).hexdigest() == hashlib.sha256(runc.stdout).hexdigest()
    assert dkvm.stderr == b"" and dkvm.returncode == 0


@pytest.mark.slow
def test_no_leaks_after_30_cycles(busybox_image):
    before = leak_snapshot()
    for i in range(10):
        assert docker_run("dkvm", busybox_image, "true").returncode == 0
        name = f"dkvm-leak-{os.getpid()}-{i}"
        try:
            run_detached("dkvm", name, busybox_image, "sleep", "100")
            sh("docker", "stop", "-t", "1", name, timeout=60)
        finally:
            sh("docker", "rm", "-f", name, check=False)
        try:
            run_detached("dkvm", name, busybox_image, "sleep", "100")
            sh("docker", "kill", name, timeout=60)
        finally:
            sh("docker", "rm", "-f", name, check=False)
    wait_until(lambda: leak_snapshot() == before, "the host to be as before", timeout=30)


def test_ctrl_c_detach_and_attach(busybox_image, container_name):
    child = pexpect.spawn("docker", ["run", "-it", "--runtime=dkvm", "--name", container_name,
                                     busybox_image, "sh"], timeout=BOOT_TIMEOUT,
                          encoding="utf-8")
    try:
        child.expect(r"[#$] ")
        interrupt_foreground_sleep(child, container_name)
        child.expect(r"[#$] ")
        child.sendline("echo status-$?")
        child.expect("status-130")
        child.sendcontrol("p")
        child.sendcontrol("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert state(container_name)[0] == "running"
    attach = pexpect.spawn("docker", ["attach", container_name], timeout=BOOT_TIMEOUT,
                           encoding="utf-8")
    try:
        attach.sendline("echo attached-$((2+3))")
        attach.expect("attached-5")
        attach.sendline("exit 6")
        attach.expect(pexpect.EOF)
    finally:
        attach.close(force=True)
    assert sh("docker", "wait", container_name, timeout=60).stdout.strip() == "6"


def test_start_ai_reaches_the_console(busybox_image, container_name):
    sh("docker", "create", "-it", "--runtime=dkvm", "--name", container_name, busybox_image, "sh")
    child = pexpect.spawn("docker", ["start", "-ai", container_name], timeout=BOOT_TIMEOUT,
                          encoding="utf-8")
    try:
        child.expect(r"[#$] ")
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3
