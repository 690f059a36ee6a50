"""Options that weaken the boundary are the operator's (issue 24, item 2): an image's
ENV is a container's environment, and an image that sets DKVM_KERNEL_APPEND,
DKVM_SYS_ADMIN or DKVM_KERNEL=image does not start under DKVM unless the host's policy
allows it, whoever runs it and however unprivileged; runc ignores DKVM_* and runs it.
Where the policy allows DKVM_KERNEL_APPEND, kernel parameters reach the guest kernel
and nothing the kernel would hand to init does."""
import json
import os
import signal
import tempfile
import uuid
from pathlib import Path

import pytest

from dockerutil import PATH_ENV, busybox_tree, dkvm_lines, docker_import, docker_run, sh
from waiting import wait_until

UNPRIVILEGED = ["-u", "65534", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
USE = ("use kernel parameters (module.param=value, or the kernel's own such as loglevel=4, "
       "mitigations=off)")


def operators(setting, permission):
    return (f"{setting} is the operator's to set, not the container's: allow {permission} "
            f"in /etc/dkvm/policy.json (\"container_may_set\") or with the runtime argument "
            f"--dkvm-allow={permission}")


HOSTILE = {   # the image's ENV -> the one line `docker run` ends with under DKVM
    "DKVM_KERNEL_APPEND=init=/rootfs/pwn": "DKVM_KERNEL_APPEND: init=/rootfs/pwn is not "
    "accepted: it chooses how the guest boots, which is DKVM's; " + USE,
    "DKVM_KERNEL_APPEND=LD_PRELOAD=/rootfs/x.so": "DKVM_KERNEL_APPEND: LD_PRELOAD=/rootfs/x.so "
    "is not accepted: the kernel would hand it to init; " + USE,
    "DKVM_KERNEL_APPEND=loglevel=4": operators("DKVM_KERNEL_APPEND=loglevel=4",
                                               "DKVM_KERNEL_APPEND"),
    "DKVM_SYS_ADMIN=1": operators("DKVM_SYS_ADMIN=1", "DKVM_SYS_ADMIN"),
    "DKVM_KERNEL=image": operators("DKVM_KERNEL=image", "DKVM_KERNEL=image"),
}


@pytest.fixture(scope="module")
def hostile_images(docker):
    """One busybox image per hostile ENV; removed afterwards."""
    tags = {}
    with tempfile.TemporaryDirectory() as tmp:
        busybox_tree(Path(tmp))
        for env in HOSTILE:
            tag = f"dkvm-test-policy-{uuid.uuid4().hex[:8]}"
            docker_import(Path(tmp), tag, [PATH_ENV, f"ENV {env}"])
            tags[env] = tag
    yield tags
    sh("docker", "rmi", "-f", *tags.values(), check=False)


@pytest.mark.parametrize("env", list(HOSTILE))
def test_an_images_env_cannot_weaken_the_boundary(env, hostile_images, operator_allows):
    operator_allows()                               # the default policy: nothing allowed
    image = hostile_images[env]
    runc = docker_run("runc", *UNPRIVILEGED, image, "id", "-u")
    assert (runc.returncode, runc.stdout) == (0, "65534\n"), runc.stderr
    out = docker_run("dkvm", *UNPRIVILEGED, image, "id", "-u")
    assert (out.returncode, out.stdout) == (125, ""), out.stderr
    (line,) = dkvm_lines(out.stderr)
    assert HOSTILE[env] in line, line
    assert "Traceback" not in out.stderr


def test_the_policy_allows_kernel_parameters_never_init(busybox_image, hostile_images,
                                                        operator_allows):
    operator_allows("DKVM_KERNEL_APPEND")
    out = docker_run("dkvm", "-e", "DKVM_KERNEL_APPEND=loglevel=4 dkvm.policy=1", busybox_image,
                     "cat", "/proc/cmdline")
    assert out.returncode == 0, out.stderr
    assert {"loglevel=4", "dkvm.policy=1"} <= set(out.stdout.split()), out.stdout
    for env in ("DKVM_KERNEL_APPEND=init=/rootfs/pwn",
                "DKVM_KERNEL_APPEND=LD_PRELOAD=/rootfs/x.so"):
        out = docker_run("dkvm", *UNPRIVILEGED, hostile_images[env], "true")
        assert out.returncode == 125
        assert HOSTILE[env] in dkvm_lines(out.stderr)[-1]
    out = docker_run("dkvm", "-e", "DKVM_KERNEL_APPEND=loglevel=4 -- /bin/sh", busybox_image,
                     "true")
    assert out.returncode == 125
    assert ("DKVM_KERNEL_APPEND: -- is not accepted: the kernel hands what follows it to "
            "init; " + USE) in dkvm_lines(out.stderr)[-1]
    # one permission does not give another
    out = docker_run("dkvm", "-e", "DKVM_SYS_ADMIN=1", busybox_image, "true")
    assert out.returncode == 125
    assert operators("DKVM_SYS_ADMIN=1", "DKVM_SYS_ADMIN") in dkvm_lines(out.stderr)[-1]


def test_a_malformed_policy_fails_create_and_doctor_says_so(busybox_image, operator_allows):
    operator_allows("DKVM_SYS_ADMN")
    out = docker_run("dkvm", busybox_image, "true")
    assert out.returncode == 125
    (line,) = dkvm_lines(out.stderr)
    assert "/etc/dkvm/policy.json: DKVM_SYS_ADMN is not a permission" in line
    doctor = sh("dkvm", "doctor", check=False)
    assert "[fail] /etc/dkvm/policy.json: DKVM_SYS_ADMN is not a permission" in doctor.stdout
    operator_allows("DKVM_SYS_ADMIN")
    doctor = sh("dkvm", "doctor", check=False)
    assert "policy (/etc/dkvm/policy.json): containers may set DKVM_SYS_ADMIN; the " \
        "operator's only: DKVM_KERNEL=image, DKVM_KERNEL_APPEND" in doctor.stdout


DAEMON_JSON = Path("/etc/docker/daemon.json")
ADMIN = "dkvm-test-admin"


def runtimes():
    return sh("docker", "info", "--format", "{{json .Runtimes}}", check=False).stdout


def reload_dockerd():
    pid = int(Path("/var/run/docker.pid").read_text().strip())
    os.kill(pid, signal.SIGHUP)


@pytest.fixture
def admin_runtime(docker, operator_allows):
    """A second registration, as the README shows it: the dkvm runtime with
    `--dkvm-allow=DKVM_SYS_ADMIN` in its runtimeArgs; daemon.json as it was afterwards."""
    operator_allows()
    before = DAEMON_JSON.read_text()
    config = json.loads(before)
    entry = dict(config["runtimes"]["dkvm"])
    entry["runtimeArgs"] = list(entry.get("runtimeArgs") or []) + ["--dkvm-allow=DKVM_SYS_ADMIN"]
    config["runtimes"][ADMIN] = entry
    DAEMON_JSON.write_text(json.dumps(config, indent=2) + "\n")
    try:
        reload_dockerd()
        wait_until(lambda: f'"{ADMIN}"' in runtimes(), f"dockerd to know {ADMIN}", timeout=30)
        yield ADMIN
    finally:
        DAEMON_JSON.write_text(before)
        reload_dockerd()
        wait_until(lambda: f'"{ADMIN}"' not in runtimes(), f"dockerd to drop {ADMIN}",
                   timeout=30)


def test_a_runtime_registration_can_allow_what_the_policy_does_not(busybox_image,
                                                                   admin_runtime):
    out = docker_run("dkvm", "-e", "DKVM_SYS_ADMIN=1", busybox_image, "true")
    assert out.returncode == 125
    assert operators("DKVM_SYS_ADMIN=1", "DKVM_SYS_ADMIN") in dkvm_lines(out.stderr)[-1]
    out = docker_run(admin_runtime, "-e", "DKVM_SYS_ADMIN=1", busybox_image, "echo", "ran")
    assert (out.returncode, out.stdout) == (0, "ran\n"), out.stderr
    # it allows that one only
    out = docker_run(admin_runtime, "-e", "DKVM_KERNEL_APPEND=loglevel=4", busybox_image,
                     "true")
    assert out.returncode == 125
    assert operators("DKVM_KERNEL_APPEND=loglevel=4", "DKVM_KERNEL_APPEND") in \
        dkvm_lines(out.stderr)[-1]
