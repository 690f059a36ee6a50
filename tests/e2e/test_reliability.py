"""Reliability: many VMs and execs at once on this 2-core machine (TCG makes them slow,
not wrong), each part of a container killed at boot and while it runs, the guest out
of memory, the host's disk full while the payload unpacks. After each fault the host
is as it was, and the next `docker run` works."""
import concurrent.futures
import os
import subprocess
import time
from pathlib import Path

import pytest

from dkvm.host.facts import kvm_usable
from dkvm.host.vm_size import split_limit
from dockerutil import docker_run, leak_snapshot, logs, sh
from waiting import wait_until

pytestmark = pytest.mark.slow

CROWD = 8                   # VMs started at once
EXECS = 20                  # concurrent execs into each of two VMs
CROWD_TIMEOUT = 600         # eight boots sharing two cores under TCG
# what a part of a container is, by its command line, among the container's processes
PARTS = {"QEMU": "qemu-system-x86_64", "virtiofsd": "/.dkvm/qemu/virtiofsd"}


def test_eight_vms_started_at_once_each_reach_their_workload(busybox_image):
    def one(number):
        return docker_run("dkvm", busybox_image, "sh", "-c",
                          f"echo vm-{number}; exit {number + 1}", timeout=CROWD_TIMEOUT)
    with concurrent.futures.ThreadPoolExecutor(CROWD) as pool:
        results = list(pool.map(one, range(CROWD)))
    assert [(r.returncode, r.stdout, r.stderr) for r in results] == \
        [(n + 1, f"vm-{n}\n", "") for n in range(CROWD)]


def test_twenty_concurrent_execs_into_each_of_two_vms(busybox_image, container_name):
    names = [container_name, container_name + "-2"]
    try:
        for name in names:
            sh("docker", "run", "-d", "--runtime=dkvm", "--name", name, busybox_image,
               "sh", "-c", "echo ready; sleep 100000")
        for name in names:
            wait_until(lambda: "ready" in logs(name), "the workload to start", timeout=120)

        def one(job):
            name, number = job
            return sh("docker", "exec", name, "sh", "-c",
                      f"echo {name}-{number}; echo err-{number} >&2; exit {number % 7}",
                      check=False, timeout=CROWD_TIMEOUT)
        jobs = [(name, n) for name in names for n in range(EXECS)]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(one, jobs))
        assert [(r.returncode, r.stdout, r.stderr) for r in results] == \
            [(n % 7, f"{name}-{n}\n", f"err-{n}\n") for name, n in jobs]
    finally:
        sh("docker", "rm", "-f", names[1], check=False, timeout=60)


def container_parts(entrypoint):
    """{part: pid} of the entrypoint's QEMU and virtiofsd, as far as they have started."""
    found = {}
    for part, pattern in PARTS.items():
        pids = sh("pgrep", "-P", entrypoint, "-f", pattern, check=False).stdout.split()
        if pids:
            found[part] = int(pids[0])
    return found


@pytest.mark.parametrize("moment", ["boot", "running"])
@pytest.mark.parametrize("victim", ["entrypoint", "QEMU", "virtiofsd"])
def test_a_part_killed_ends_the_container_and_leaves_nothing(busybox_image, container_name,
                                                            victim, moment):
    before = leak_snapshot()
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, busybox_image,
       "sh", "-c", "echo ready; sleep 100000")
    entrypoint = sh("docker", "inspect", "-f", "{{.State.Pid}}", container_name).stdout.strip()
    if moment == "running":
        wait_until(lambda: "ready" in logs(container_name), "the workload to start")
    if victim == "entrypoint":
        pid = int(entrypoint)
    else:
        pid = wait_until(lambda: container_parts(entrypoint).get(victim),
                         f"{victim} to start", timeout=60, interval=0.01)
    booting = "ready" not in logs(container_name)
    os.kill(pid, 9)
    code = sh("docker", "wait", container_name, timeout=60).stdout.strip()
    if victim == "entrypoint":
        assert code == "137"                    # as runc's PID 1 killed: nobody to say more
    else:
        assert code != "0"
        err = sh("docker", "logs", container_name).stderr
        assert victim in err and "signal 9" in err, err
    if moment == "boot":
        assert booting, "the VM had booted before the kill: the test did not test a boot"
    sh("docker", "rm", container_name)
    wait_until(lambda: leak_snapshot() == before, "the host to be as before", timeout=30)
    assert docker_run("dkvm", busybox_image, "echo", "next").stdout == "next\n"


def test_an_exec_relay_killed_ends_its_process_in_the_guest(busybox_image, container_name):
    """runc's exec process killed: `docker exec` ends 137 and the container runs on.
    Here that process is the relay on the host: its process in the guest goes too."""
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, busybox_image,
       "sh", "-c", "echo ready; sleep 100000")
    wait_until(lambda: "ready" in logs(container_name), "the workload to start")
    execution = subprocess.Popen(["docker", "exec", container_name, "sleep", "7777"])
    try:
        entrypoint = sh("docker", "inspect", "-f", "{{.State.Pid}}",
                        container_name).stdout.strip()
        relay = wait_until(lambda: sh("pgrep", "-f", "dkvm-exec-relay",
                                      check=False).stdout.split(),
                           "the exec relay to start", timeout=60)
        relay = [pid for pid in relay if pid != entrypoint]
        wait_until(lambda: "sleep 7777" in ps(container_name), "the exec to start", timeout=60)
        for pid in relay:
            os.kill(int(pid), 9)
        assert execution.wait(timeout=60) == 137
    finally:
        execution.kill()
        execution.wait()
    wait_until(lambda: "sleep 7777" not in ps(container_name),
               "the exec's process in the guest to end", timeout=30)
    assert sh("docker", "inspect", "-f", "{{.State.Running}}",
              container_name).stdout.strip() == "true"


def ps(name):
    return sh("docker", "exec", name, "ps", "-o", "args", check=False).stdout


def test_the_guest_out_of_memory_kills_the_workloads_biggest_as_under_runc(busybox_image):
    """A workload that allocates until it cannot: the guest's OOM killer ends it (its
    shell reports 137 and goes on), never the host's killing QEMU."""
    script = "tail /dev/zero; echo status=$?"
    results = {runtime: docker_run(runtime, "-m", "256m", busybox_image, "sh", "-c", script,
                                   timeout=300) for runtime in ("runc", "dkvm")}
    assert [(r.returncode, r.stdout) for r in results.values()] == [(0, "status=137\n")] * 2


def test_the_memory_limit_holds_the_whole_vm(busybox_image, container_name):
    """`-m 256m` is the container's limit as under runc, QEMU's overhead inside it: the
    guest fills its RAM twice over (the workload killed each time by the guest's OOM
    killer) and the host's OOM killer never runs in the container's cgroup."""
    script = ("for round in 1 2; do tail /dev/zero; echo status=$?; done; "
              "echo done; sleep 100000")
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, "-m", "256m",
       busybox_image, "sh", "-c", script)
    try:
        wait_until(lambda: "done" in logs(container_name), "the guest to run out twice",
                   timeout=300)
        assert logs(container_name) == "status=137\nstatus=137\ndone\n"
        cgroup = Path("/sys/fs/cgroup/memory/docker",
                      sh("docker", "inspect", "-f", "{{.Id}}", container_name).stdout.strip())
        assert int((cgroup / "memory.limit_in_bytes").read_text()) == 256 << 20
        # the guest's RAM filled: the container's peak holds all of it, and more
        guest_mib, cache_mib, _ = split_limit(256, "kvm" if kvm_usable() else "tcg")
        assert int((cgroup / "memory.max_usage_in_bytes").read_text()) > \
            (guest_mib + cache_mib) << 20
        oom = dict(line.split()
                   for line in (cgroup / "memory.oom_control").read_text().splitlines())
        assert oom["oom_kill"] == "0", oom
        assert sh("docker", "exec", container_name, "echo", "alive").stdout == "alive\n"
    finally:
        sh("docker", "rm", "-f", container_name, check=False)


def test_docker_update_cannot_set_a_limit_below_the_vms_size(busybox_image, container_name):
    """The VM's RAM is fixed at boot: `docker update -m` may raise the limit, not set
    it below the VM (that would leave the host's OOM killer to end QEMU later). The
    refused update changes nothing; runc's containers update as before."""
    names = {"dkvm": container_name, "runc": container_name + "-runc",
             "unlimited": container_name + "-unlimited"}
    try:
        for kind, name in names.items():
            memory = [] if kind == "unlimited" else ["-m", "512m"]
            runtime = ["--runtime=runc"] if kind == "runc" else ["--runtime=dkvm", "-e",
                                                                 "DKVM_ACCEL=tcg"]
            sh("docker", "run", "-d", *runtime, "--name", name, *memory, busybox_image,
               "sleep", "100000")

        def update(name, limit):
            return sh("docker", "update", "-m", limit, "--memory-swap", "4g", name, check=False)

        refused = update(names["dkvm"], "300m")
        assert refused.returncode != 0
        assert "memory limit 300MiB is below what this VM was sized for when it booted " \
               "(512MiB" in refused.stderr, refused.stderr
        assert sh("docker", "inspect", "-f", "{{.HostConfig.Memory}}",
                  names["dkvm"]).stdout.strip() == str(512 << 20)
        assert update(names["dkvm"], "1g").returncode == 0
        assert update(names["runc"], "300m").returncode == 0
        # without -m the VM has 1 GiB of RAM and, under TCG, a 256 MiB translation cache
        assert "not set below 1456m" in update(names["unlimited"], "1g").stderr
        assert update(names["unlimited"], "1456m").returncode == 0
        for name, limit in ((names["dkvm"], 1 << 30), (names["runc"], 300 << 20),
                            (names["unlimited"], 1456 << 20)):
            cgroup = Path("/sys/fs/cgroup/memory/docker",
                          sh("docker", "inspect", "-f", "{{.Id}}", name).stdout.strip())
            assert int((cgroup / "memory.limit_in_bytes").read_text()) == limit
        assert sh("docker", "exec", names["dkvm"], "echo", "alive").stdout == "alive\n"
    finally:
        sh("docker", "rm", "-f", *names.values(), check=False)


def test_a_full_disk_while_the_payload_unpacks_is_one_error_and_nothing_half_made(
        busybox_image, tmp_path):
    """/var/lib/dkvm on a 16 MiB filesystem: the payload (about 140 MB) cannot unpack.
    `docker run` fails at create with one line; nothing is left behind there; with the
    space back, the next run unpacks it and works."""
    sh("mount", "-t", "tmpfs", "-o", "size=16m", "dkvm-test-full", "/var/lib/dkvm")
    try:
        out = docker_run("dkvm", busybox_image, "true")
        assert out.returncode == 125
        assert "cannot unpack DKVM's payload into /var/lib/dkvm: No space left on device" \
            in out.stderr, out.stderr
        assert [p for p in os.listdir("/var/lib/dkvm") if p != ".lock"] == []
    finally:
        wait_until(lambda: subprocess.run(["umount", "/var/lib/dkvm"]).returncode == 0,
                   "the test's tmpfs to unmount", timeout=30, interval=0.5)
    assert docker_run("dkvm", busybox_image, "echo", "unpacked").stdout == "unpacked\n"


# --- dockerd restarted under running VMs

DAEMON_JSON = "/etc/docker/daemon.json"
DOCKERD_PIDFILE = "/var/run/docker.pid"
DOCKERD_WAIT = 90


def dockerd_pid():
    try:
        pid = int(Path(DOCKERD_PIDFILE).read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return 0


def stop_dockerd():
    """SIGTERM, as systemd stops it; back once it has exited."""
    pid = dockerd_pid()
    assert pid, "no dockerd to stop"
    os.kill(pid, 15)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "dockerd to exit",
               timeout=DOCKERD_WAIT)


def start_dockerd():
    """As setup.sh starts it: systemd's unit, or dockerd in the background."""
    if os.path.isdir("/run/systemd/system"):
        sh("systemctl", "start", "docker")
    else:
        with open("/var/log/dkvm-dockerd.log", "a") as log:     # not our child: setsid -f
            subprocess.run(["setsid", "-f", "dockerd"], stdout=log, stderr=subprocess.STDOUT,
                           check=True, timeout=30)
    wait_until(lambda: sh("docker", "info", check=False, timeout=30).returncode == 0,
               "dockerd to answer", timeout=DOCKERD_WAIT)


def set_live_restore(enabled):
    """daemon.json's live-restore, the rest kept; dockerd reloads it on SIGHUP."""
    import json
    config = json.loads(Path(DAEMON_JSON).read_text())
    config["live-restore"] = enabled
    Path(DAEMON_JSON).write_text(json.dumps(config, indent=2))
    os.kill(dockerd_pid(), 1)
    wait_until(lambda: sh("docker", "info", "-f", "{{.LiveRestoreEnabled}}",
                          timeout=30).stdout.strip() == str(enabled).lower(),
               f"dockerd to reload live-restore={enabled}", timeout=30)


@pytest.fixture
def daemon_config():
    """daemon.json and a running dockerd as they were, whatever the test did."""
    original = Path(DAEMON_JSON).read_text()
    yield
    Path(DAEMON_JSON).write_text(original)
    if not dockerd_pid():
        start_dockerd()
    else:
        os.kill(dockerd_pid(), 1)


def test_with_live_restore_a_vm_runs_on_across_a_dockerd_restart(busybox_image,
                                                                 container_name, daemon_config):
    set_live_restore(True)
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, busybox_image,
       "sh", "-c", 'trap "echo stopping; exit 4" TERM; echo ready; sleep 100000 & wait')
    wait_until(lambda: "ready" in logs(container_name), "the workload to start")
    entrypoint = int(sh("docker", "inspect", "-f", "{{.State.Pid}}", container_name).stdout)
    qemu = sh("pgrep", "-P", str(entrypoint), "-f", PARTS["QEMU"]).stdout.split()
    stop_dockerd()
    assert os.path.exists(f"/proc/{entrypoint}") and os.path.exists(f"/proc/{qemu[0]}")
    start_dockerd()
    out = sh("docker", "exec", container_name, "sh", "-c", "echo after; exit 2", check=False)
    assert (out.returncode, out.stdout) == (2, "after\n")
    sh("docker", "stop", container_name, timeout=60)
    assert sh("docker", "wait", container_name, timeout=60).stdout.strip() == "4"
    assert logs(container_name) == "ready\nstopping\n"


def test_without_live_restore_a_dockerd_restart_stops_vms_and_leaves_nothing(
        busybox_image, container_name, daemon_config):
    set_live_restore(False)
    before = leak_snapshot()
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, busybox_image,
       "sh", "-c", 'trap "exit 4" TERM; echo ready; sleep 100000 & wait')
    wait_until(lambda: "ready" in logs(container_name), "the workload to start")
    stop_dockerd()
    wait_until(lambda: leak_snapshot() == before, "the host to be as before", timeout=30)
    start_dockerd()
    status = sh("docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}",
                container_name).stdout.split()
    assert status == ["exited", "4"]
    assert docker_run("dkvm", busybox_image, "echo", "next").stdout == "next\n"


def test_a_vm_that_stops_answering_ends_its_container_saying_so(busybox_image,
                                                                container_name):
    """QEMU frozen on the host (SIGSTOP) stands for any hang of the guest: after
    DKVM_WATCHDOG seconds of silence the container ends with the reason, not a
    `docker run` that never returns."""
    before = leak_snapshot()
    sh("docker", "run", "-d", "--runtime=dkvm", "--env", "DKVM_WATCHDOG=10", "--name",
       container_name, busybox_image, "sh", "-c", "echo ready; sleep 100000")
    wait_until(lambda: "ready" in logs(container_name), "the workload to start")
    entrypoint = sh("docker", "inspect", "-f", "{{.State.Pid}}", container_name).stdout.strip()
    os.kill(container_parts(entrypoint)["QEMU"], 19)
    started = time.monotonic()
    assert sh("docker", "wait", container_name, timeout=120).stdout.strip() != "0"
    assert 10 <= time.monotonic() - started < 60
    err = sh("docker", "logs", container_name).stderr
    assert "the VM stopped answering: no word from its init for 10s (DKVM_WATCHDOG)" in err
    sh("docker", "rm", container_name)
    wait_until(lambda: leak_snapshot() == before, "the host to be as before", timeout=30)
