"""Every signal and the docker run flags that set the workload's process: each case
run with runc and with dkvm on the same image, and compared."""
import os
import time
from pathlib import Path

import pytest

from dockerutil import dkvm_lines, docker_run, logs, sh, with_stop_signal
from waiting import wait_until

RUNTIMES = ["runc", "dkvm"]
BOOTED = 120                # a VM's workload up, under TCG on a busy machine
RTSTOP = "dkvm-test-rtstop"
# every signal `docker kill` can send that a shell can trap: 1-31 but KILL, STOP and
# CHLD (the shell's own children send it), and real-time ones across the range
CAUGHT = [s for s in range(1, 32) if s not in (9, 17, 19)] + [34, 37, 50, 64]


def run_detached(runtime, name, image, *cmd, flags=()):
    sh("docker", "run", "-d", f"--runtime={runtime}", "--name", name, *flags, image, *cmd)


def start_ready(runtime, name, image, script, flags=()):
    """`sh -c script` detached; back once it has printed `ready` (the VM booted)."""
    run_detached(runtime, name, image, "sh", "-c", script, flags=flags)
    wait_until(lambda: "ready" in logs(name), "the workload to start", timeout=BOOTED)


def uptime():
    """The host's clock as containers read it (/proc/uptime: one kernel)."""
    return float(Path("/proc/uptime").read_text().split()[0])


def outputs(image, script, flags=()):
    """(exit code, stdout) of `sh -c script` under each runtime."""
    results = {}
    for runtime in RUNTIMES:
        out = docker_run(runtime, *flags, image, "sh", "-c", script)
        results[runtime] = (out.returncode, out.stdout)
    return results


def established(name, port):
    """A TCP connection to `port` established in the container (/proc/net/tcp and
    tcp6: local address:port in hex, state 01)."""
    table = sh("docker", "exec", name, "cat", "/proc/net/tcp", "/proc/net/tcp6",
               check=False).stdout
    return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "01"
               for line in table.splitlines()[1:] if len(line.split()) > 3)


@pytest.fixture(scope="session")
def rtstop_image(busybox_image):
    """busybox with systemd's stop signal."""
    with_stop_signal(busybox_image, RTSTOP, "SIGRTMIN+3")
    return RTSTOP


# --- signals -----------------------------------------------------------------------

@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_signal_reaches_the_workload(busybox_image, container_name, runtime):
    traps = "; ".join(f'trap "echo got-{s}" {s}' for s in CAUGHT)
    start_ready(runtime, container_name, busybox_image,
                f"{traps}; echo ready; while :; do sleep 0.1; done")
    for sig in CAUGHT:
        sh("docker", "kill", "-s", str(sig), container_name)
        # one at a time: a shell runs one trap per signal pending, not one per kill
        wait_until(lambda: f"got-{sig}\n" in logs(container_name), f"signal {sig} to arrive",
                   timeout=30, interval=0.05)
    assert sh("docker", "inspect", "-f", "{{.State.Running}}", container_name).stdout.strip() \
        == "true"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_signal_sent_while_the_vm_boots_reaches_the_workloads_trap(busybox_image,
                                                                     container_name, runtime):
    """`docker kill` at once after `docker run -d`: under runc the shell has set its trap
    by then; under DKVM the VM is still booting, and the signal must wait for it."""
    run_detached(runtime, container_name, busybox_image, "sh", "-c",
                 'trap "echo got-TERM; exit 5" TERM; sleep 60 & wait')
    sh("docker", "kill", "-s", "TERM", container_name)
    assert sh("docker", "wait", container_name, timeout=BOOTED).stdout.strip() == "5"
    assert logs(container_name) == "got-TERM\n"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_docker_stop_with_rtmin3_as_stopsignal_ends_it_at_once(rtstop_image, container_name,
                                                               runtime):
    start_ready(runtime, container_name, rtstop_image,
                'trap "echo got-37; exit 0" 37; echo ready; while :; do sleep 0.1; done')
    start = time.monotonic()
    sh("docker", "stop", container_name)
    took = time.monotonic() - start
    assert sh("docker", "wait", container_name, timeout=60).stdout.strip() == "0"
    assert "got-37" in logs(container_name)
    assert took < 3, f"docker stop took {took:.1f}s: the stop signal was not delivered"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_docker_kill_closes_the_workloads_connections(busybox_image, debian_image,
                                                      container_name, runtime):
    """SIGKILL kills the workload in the guest first: its kernel closes its sockets,
    and a peer sees the connection end within a second, as under runc."""
    start_ready(runtime, container_name, busybox_image,
                "echo ready; sleep 1000 | nc -l -p 8080")
    address = sh("docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}",
                 container_name).stdout.strip()
    client = container_name + "-client"
    try:
        run_detached("runc", client, debian_image, "bash", "-c",
                     f"until exec 3<>/dev/tcp/{address}/8080; do sleep 0.2; done 2>/dev/null; "
                     "echo connected; cat <&3; echo closed $(cut -d' ' -f1 /proc/uptime)")
        wait_until(lambda: "connected" in logs(client), "the client to connect", timeout=60)
        wait_until(lambda: established(container_name, 8080), "the server to accept",
                   timeout=30)
        killed = uptime()
        sh("docker", "kill", container_name)
        wait_until(lambda: "closed" in logs(client), "the client to see the close", timeout=30)
        closed = float(logs(client).split("closed ")[1].split()[0])
        assert closed - killed < 1.0, f"the peer saw the close {closed - killed:.2f}s later"
        assert sh("docker", "wait", container_name, timeout=60).stdout.strip() == "137"
    finally:
        sh("docker", "rm", "-f", client, check=False, timeout=60)


def test_docker_kill_ends_a_vm_whose_guest_does_not_answer(busybox_image, container_name):
    """The guest's answer is awaited a bounded time: with the VM frozen (QEMU
    stopped), `docker kill` still ends the container within a couple of seconds."""
    start_ready("dkvm", container_name, busybox_image, "echo ready; while :; do sleep 1; done")
    pids = sh("docker", "top", container_name, "-eo", "pid,args").stdout.split("\n")[1:]
    qemu = [line.split()[0] for line in pids if "qemu-system" in line]
    assert qemu, pids
    sh("kill", "-STOP", qemu[0])
    start = time.monotonic()
    sh("docker", "kill", container_name)
    assert sh("docker", "wait", container_name, timeout=60).stdout.strip() == "137"
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sigstop_stops_the_workload_and_sigcont_resumes_it(busybox_image, container_name,
                                                           runtime):
    start_ready(runtime, container_name, busybox_image,
                "echo ready; while :; do sleep 0.1; done")

    def pid1_state():
        out = sh("docker", "exec", container_name, "ps", "-o", "pid,stat").stdout
        return [line.split()[1] for line in out.splitlines()[1:] if line.split()[0] == "1"][0]

    sh("docker", "kill", "-s", "STOP", container_name)
    wait_until(lambda: pid1_state().startswith("T"), "the workload to stop", timeout=30)
    sh("docker", "kill", "-s", "CONT", container_name)
    wait_until(lambda: not pid1_state().startswith("T"), "the workload to go on", timeout=30)
    assert sh("docker", "inspect", "-f", "{{.State.Running}}", container_name).stdout.strip() \
        == "true"


@pytest.mark.parametrize("flags,script", [
    ((), "poweroff -f; echo still-here $?"),       # no CAP_SYS_BOOT: refused
    (("--cap-add", "SYS_BOOT"), "poweroff -f; sleep 10; echo still-here"),
    (("--cap-add", "SYS_BOOT"), "reboot -f; sleep 10; echo still-here"),
])
def test_the_workloads_own_poweroff_or_reboot_ends_it_as_under_runc(busybox_image, flags,
                                                                    script):
    results = outputs(busybox_image, script, flags)
    assert results["dkvm"] == results["runc"]


# --- the process's settings --------------------------------------------------------

STATUS = "grep -E '^(CapBnd|CapEff|CapPrm|CapAmb|NoNewPrivs)' /proc/self/status"


@pytest.mark.parametrize("flags", [
    ("--cap-drop", "ALL"),
    ("--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE", "--user", "1000"),
    ("--cap-drop", "ALL", "--cap-add", "CHOWN", "--cap-add", "KILL"),
])
def test_a_minimal_capability_set_is_runcs(busybox_image, flags):
    results = outputs(busybox_image, STATUS + "; chown 1 /proc/self/fd/0 2>&1 | wc -l", flags)
    assert results["dkvm"] == results["runc"]
    assert results["dkvm"][0] == 0


def test_a_dropped_capability_is_gone_in_the_guest(busybox_image):
    """--cap-drop NET_RAW: no ping, as under runc (the rest of the VM's root stays)."""
    results = outputs(busybox_image, "ping -c1 -W1 127.0.0.1 >/dev/null 2>&1; echo ping $?",
                      ("--cap-drop", "NET_RAW"))
    assert results["dkvm"] == results["runc"] == (0, "ping 1\n")
    assert docker_run("dkvm", busybox_image, "sh", "-c",
                      "ping -c1 -W1 127.0.0.1 >/dev/null; echo ping $?").stdout == "ping 0\n"


def test_no_new_privileges_in_the_workload_and_its_execs(busybox_image, container_name):
    flags = ("--security-opt", "no-new-privileges")
    results = outputs(busybox_image, "grep NoNewPrivs /proc/self/status", flags)
    assert results["dkvm"] == results["runc"] == (0, "NoNewPrivs:\t1\n")
    run_detached("dkvm", container_name, busybox_image, "sleep", "300", flags=flags)
    wait_until(lambda: sh("docker", "exec", container_name, "true", check=False).returncode
               == 0, "the VM to take execs", timeout=BOOTED)
    assert sh("docker", "exec", container_name, "grep", "NoNewPrivs",
              "/proc/self/status").stdout == "NoNewPrivs:\t1\n"


@pytest.mark.parametrize("flags", [(), ("--ulimit", "nofile=64:64"),
                                   ("--ulimit", "nofile=100:200", "--ulimit", "nproc=500")])
def test_rlimits_as_runc_sets_them(busybox_image, flags):
    """Explicit `--ulimit`s, and the engine's limits where none is given."""
    results = outputs(busybox_image, "ulimit -Sn; ulimit -Hn; ulimit -u", flags)
    assert results["dkvm"] == results["runc"]
    assert results["dkvm"][0] == 0


def test_an_exec_gets_the_containers_rlimits(busybox_image, container_name):
    run_detached("dkvm", container_name, busybox_image, "sleep", "300",
                 flags=("--ulimit", "nofile=64:64"))
    wait_until(lambda: sh("docker", "exec", container_name, "true", check=False).returncode
               == 0, "the VM to take execs", timeout=BOOTED)
    assert sh("docker", "exec", container_name, "sh", "-c", "ulimit -n").stdout == "64\n"


def test_pids_limit_counts_the_workloads_processes(busybox_image):
    """Under runc the limit counts the container's tasks; in the VM, the workload's
    (not QEMU's threads): the same number of children start."""
    script = ("mkdir /started; (for i in 1 2 3 4 5 6 7 8 9 10 11 12; do "
              "{ echo > /started/$i; exec sleep 3; } & done) 2>/dev/null; sleep 4; "
              "ls /started | wc -l")
    results = outputs(busybox_image, script, ("--pids-limit", "8"))
    assert results["dkvm"] == results["runc"]
    assert int(results["dkvm"][1]) == 6      # the shell and the subshell count too


def test_a_device_is_made_in_the_guest_as_runc_makes_it(busybox_image):
    results = outputs(busybox_image, "stat -c '%F %t:%T %a %u:%g' /dev/myzero; "
                      "head -c 4 /dev/myzero | od -An -tx1",
                      ("--device", "/dev/zero:/dev/myzero"))
    assert results["dkvm"] == results["runc"]
    assert results["dkvm"][1].startswith("character special file 1:5 666 0:0")


def test_a_device_from_a_module_of_the_guest_kernel_works_as_under_runc(busybox_image):
    """The guest kernel loads tun when the node is opened (its module requests are
    served from the payload)."""
    results = outputs(busybox_image, "stat -c '%F %t:%T' /dev/net/tun; "
                      "exec 3<>/dev/net/tun && echo opened", ("--device", "/dev/net/tun"))
    assert results["dkvm"] == results["runc"] == (0, "character special file a:c8\nopened\n")


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs a host device the guest "
                    "kernel has no driver for")
def test_a_device_the_vm_has_no_driver_for_fails_at_create_with_one_line(busybox_image):
    out = docker_run("dkvm", "--device", "/dev/kvm", busybox_image, "true")
    assert out.returncode == 125
    (line,) = dkvm_lines(out.stderr)
    assert "--device /dev/kvm: the VM's kernel has no driver for c 10:232" in line


def test_a_seccomp_profile_that_does_not_name_clone3_runs_as_under_runc(busybox_image, tmp_path):
    """A profile like the OCI validation suite's: Docker's own without its clone3 rule,
    so clone3 gets the default EPERM. runc's workload never makes a thread; the VM's
    container side (QEMU, virtiofsd) does, and gets ENOSYS for clone3 instead."""
    import json
    fixture = Path(__file__).parents[1] / "fixtures" / "config-plain.json"
    profile = json.loads(fixture.read_text())["linux"]["seccomp"]
    profile["syscalls"] = [rule for rule in profile["syscalls"] if "clone3" not in rule["names"]]
    path = tmp_path / "no-clone3.json"
    path.write_text(json.dumps(profile))
    results = outputs(busybox_image, "echo ok; exit 4",
                      flags=["--security-opt", f"seccomp={path}"])
    assert results["dkvm"] == results["runc"] == (4, "ok\n")
