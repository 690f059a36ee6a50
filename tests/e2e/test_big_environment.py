"""A big environment (160 KiB and more, each variable under the kernel's 128 KiB per
string, as runc needs) reaches the workload and each exec whole, as under runc:
from `docker run -e`, `docker exec -e`, an image's ENV, Podman and containerd. DKVM
hands the plan and each exec's request over apart from the environment (handoff):
one environment string of it failed with "argument list too long"."""
import shutil
import subprocess

import pytest

from dockerutil import RUN_TIMEOUT, load_into_engine, sh
from waiting import wait_until

RUNTIMES = ("runc", "dkvm")
# 40 variables of 4 KiB and one of 120 KiB: 280 KiB in all, past the 128 KiB that one
# environment string may hold
BIG_ENV = {f"BIG{i:02d}": chr(ord("a") + i % 26) * 4096 for i in range(40)}
BIG_ENV["HUGE"] = "h" * (120 << 10)
EXEC_ENV = {f"EXEC{i:02d}": chr(ord("A") + i % 26) * 4096 for i in range(40)}
EXEC_ENV["EXEC_HUGE"] = "e" * (120 << 10)
# what the workload sees: its environment (less HOSTNAME, the container's own id) as
# a checksum, its size, and the number of big variables
REPORT = ("env | grep -v '^HOSTNAME=' | sort | md5sum | cut -d' ' -f1; "
          "env | grep -v '^HOSTNAME=' | wc -c; env | grep -cE '^[A-Z_]*[0-9]{2}=|HUGE='")
WAIT = "; echo reported; exec sleep 600"


def env_flags(env):
    return [word for name, value in env.items() for word in ("-e", f"{name}={value}")]


def expected(*envs):
    """The size and count the report shows for `envs` alone (a lower bound of the
    whole, which also has PATH and HOME)."""
    size = sum(len(f"{name}={value}\n") for env in envs for name, value in env.items())
    return size, sum(len(env) for env in envs)


def report_of(text):
    checksum, size, count = text.split()[:3]
    return checksum, int(size), int(count)


@pytest.fixture(scope="module")
def started(busybox_image):
    """One container per runtime, run with the big environment: what its workload
    reported, and its name (it sleeps on, for the execs)."""
    names = {runtime: f"dkvm-bigenv-{runtime}" for runtime in RUNTIMES}
    reports = {}
    try:
        for runtime, name in names.items():
            sh("docker", "rm", "-f", name, check=False)
            sh("docker", "run", "-d", f"--runtime={runtime}", "--name", name,
               *env_flags(BIG_ENV), busybox_image, "sh", "-c", REPORT + WAIT)
        for runtime, name in names.items():
            out = wait_until(lambda: "reported" in (text := sh("docker", "logs", name,
                                                               check=False).stdout) and text,
                             f"{runtime}'s workload to report its environment", RUN_TIMEOUT)
            reports[runtime] = report_of(out)
        yield names, reports
    finally:
        for name in names.values():
            sh("docker", "rm", "-f", name, check=False)


def test_docker_run_with_a_big_environment_matches_runc(started):
    _, reports = started
    size, count = expected(BIG_ENV)
    assert reports["dkvm"] == reports["runc"]
    assert reports["dkvm"][1] > size and reports["dkvm"][2] == count


def test_docker_exec_with_a_big_environment_matches_runc(started):
    """The exec sees the container's environment and its own `-e`: 560 KiB."""
    names, _ = started
    outs = {runtime: sh("docker", "exec", *env_flags(EXEC_ENV), name, "sh", "-c", REPORT,
                        check=False) for runtime, name in names.items()}
    assert outs["dkvm"].returncode == outs["runc"].returncode == 0, outs["dkvm"].stderr
    assert outs["dkvm"].stderr == outs["runc"].stderr == ""
    size, count = expected(BIG_ENV, EXEC_ENV)
    _, seen_size, seen_count = report_of(outs["dkvm"].stdout)
    assert report_of(outs["dkvm"].stdout) == report_of(outs["runc"].stdout)
    assert seen_size > size and seen_count == count


@pytest.fixture(scope="module")
def big_env_image(busybox_image):
    """busybox whose image ENV is the big environment: committed from a container made
    with it (a Dockerfile line stops at 64 KiB)."""
    tag, name = "dkvm-test-big-env", "dkvm-bigenv-commit"
    sh("docker", "rm", "-f", name, check=False)
    sh("docker", "create", "--runtime=runc", "--name", name, *env_flags(BIG_ENV), busybox_image,
       "true")
    try:
        sh("docker", "commit", name, tag)
    finally:
        sh("docker", "rm", "-f", name, check=False)
    yield tag
    sh("docker", "rmi", "-f", tag, check=False)


def test_an_image_whose_env_is_big_runs_as_under_runc(big_env_image):
    outs = {runtime: sh("docker", "run", "--rm", f"--runtime={runtime}", big_env_image,
                        "sh", "-c", REPORT, check=False) for runtime in RUNTIMES}
    assert outs["dkvm"].returncode == outs["runc"].returncode == 0, outs["dkvm"].stderr
    assert report_of(outs["dkvm"].stdout) == report_of(outs["runc"].stdout)
    assert report_of(outs["dkvm"].stdout)[2] == len(BIG_ENV)


# --- other engines -------------------------------------------------------------------

ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
PODMAN_IMAGE = "localhost/dkvm-test-busybox:latest"


@pytest.mark.slow
def test_podman_run_and_exec_with_a_big_environment_match_runc(busybox_image):
    if not shutil.which("podman"):
        pytest.skip("no podman on this host")
    load_into_engine(busybox_image, ["podman", "load"])
    results, kernels = {}, {}
    for runtime in RUNTIMES:
        name = f"dkvm-bigenv-podman-{runtime}"
        engine = ["podman"] + (["--runtime", "dkvm"] if runtime == "dkvm" else [])
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True,
                       timeout=60)
        try:
            run = subprocess.run([*engine, "run", "-d", "--name", name, *ULIMITS,
                                  *env_flags(BIG_ENV), PODMAN_IMAGE, "sh", "-c", REPORT + WAIT],
                                 capture_output=True, text=True, timeout=RUN_TIMEOUT)
            assert run.returncode == 0, run.stderr
            logs = wait_until(lambda: "reported" in (text := subprocess.run(
                ["podman", "logs", name], capture_output=True, text=True,
                timeout=60).stdout) and text, f"podman {runtime}'s workload", RUN_TIMEOUT)
            exec_out = subprocess.run([*engine, "exec", *env_flags(EXEC_ENV), name, "sh", "-c",
                                       REPORT + "; uname -r"], capture_output=True, text=True,
                                      timeout=RUN_TIMEOUT)
            assert exec_out.returncode == 0, exec_out.stderr
            results[runtime] = (report_of(logs), report_of(exec_out.stdout))
            kernels[runtime] = exec_out.stdout.split()[-1]
        finally:
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True,
                           timeout=60)
    assert results["dkvm"] == results["runc"]
    assert results["dkvm"][0][2] == len(BIG_ENV)
    assert results["dkvm"][1][2] == len(BIG_ENV) + len(EXEC_ENV)
    assert kernels["dkvm"] != kernels["runc"]         # the exec ran in the VM


CTR_SOCKET = "/var/run/docker/containerd/containerd.sock"     # dockerd's containerd
CTR_NAMESPACE = "dkvm-test"
CTR_IMAGE = "docker.io/library/dkvm-test-busybox:latest"


def ctr(*args, timeout=RUN_TIMEOUT):
    return subprocess.run(["ctr", "--address", CTR_SOCKET, "--namespace", CTR_NAMESPACE, *args],
                          capture_output=True, text=True, timeout=timeout)


def ctr_env(env):
    return [word for name, value in env.items() for word in ("--env", f"{name}={value}")]


@pytest.mark.slow
def test_containerd_run_and_exec_with_a_big_environment_match_runc(busybox_image):
    if not shutil.which("ctr"):
        pytest.skip("no ctr on this host")
    load_into_engine(busybox_image, ["ctr", "--address", CTR_SOCKET, "--namespace",
                                     CTR_NAMESPACE, "images", "import", "-"])
    results, kernels = {}, {}
    for runtime in RUNTIMES:
        binary = shutil.which("runc") if runtime == "runc" else "/usr/local/bin/dkvm-runtime"
        name = f"dkvm-bigenv-ctr-{runtime}"
        ctr("task", "kill", "-s", "KILL", name)
        ctr("container", "rm", name)
        try:
            run = ctr("run", "-d", "--runc-binary", binary, *ctr_env(BIG_ENV), CTR_IMAGE, name,
                      "sh", "-c", "{ " + REPORT + "; } > /partial && mv /partial /report" + WAIT)
            assert run.returncode == 0, run.stderr
            first = wait_until(lambda: "reported" in (out := ctr(
                "task", "exec", "--exec-id", "read", name, "sh", "-c",
                "cat /report 2>/dev/null && echo reported").stdout) and out,
                f"ctr {runtime}'s workload", RUN_TIMEOUT)
            # ctr's exec has no --env: its process has the container's environment
            exec_out = ctr("task", "exec", "--exec-id", "big", name, "sh", "-c",
                           REPORT + "; uname -r")
            assert exec_out.returncode == 0, exec_out.stderr
            results[runtime] = (report_of(first), report_of(exec_out.stdout))
            kernels[runtime] = exec_out.stdout.split()[-1]
        finally:
            ctr("task", "kill", "-s", "KILL", name)
            wait_until(lambda: ctr("task", "delete", name).returncode == 0 or
                       name not in ctr("task", "ls").stdout, f"ctr {runtime}'s task to end", 60)
            ctr("container", "rm", name)
    assert results["dkvm"] == results["runc"]
    assert results["dkvm"][0][2] == results["dkvm"][1][2] == len(BIG_ENV)
    assert kernels["dkvm"] != kernels["runc"]         # the exec ran in the VM
