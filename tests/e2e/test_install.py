"""`dkvm install` registers the runtime with each engine on the host: it keeps the rest
of daemon.json and containerd's config, backs them up, is idempotent, and `uninstall`
gives them back as they were; the engines themselves load what it wrote."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dockerutil import sh
from waiting import poll, wait_until

pytestmark = pytest.mark.slow

DAEMON_JSON = Path("/etc/docker/daemon.json")
BACKUP = Path("/etc/docker/daemon.json.dkvm-backup")
PODMAN_DROP_IN = Path("/etc/containers/containers.conf.d/dkvm.conf")
CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")


def test_install_is_idempotent_and_keeps_other_settings(docker):
    original = DAEMON_JSON.read_text()
    cfg = json.loads(original)
    cfg["labels"] = ["dkvm-test=kept"]
    cfg.setdefault("runtimes", {})["other"] = {"path": "/usr/sbin/runc"}
    DAEMON_JSON.write_text(json.dumps(cfg))
    try:
        for _ in range(2):
            out = sh("dkvm", "install")
            assert "registered" in out.stdout
        after = json.loads(DAEMON_JSON.read_text())
        assert after["labels"] == ["dkvm-test=kept"]
        assert after["runtimes"]["other"] == {"path": "/usr/sbin/runc"}
        assert after["runtimes"]["dkvm"]["path"] == "/usr/local/bin/dkvm-runtime"
        assert json.loads(BACKUP.read_text())["labels"] == ["dkvm-test=kept"]
        assert os.path.realpath("/usr/local/bin/dkvm-runtime") == "/usr/local/bin/dkvm.pyz"
        # dockerd reloads on SIGHUP asynchronously
        wait_until(lambda: {"dkvm", "other"} <= set(json.loads(sh(
            "docker", "info", "--format", "{{json .Runtimes}}").stdout)),
            "dockerd to list both runtimes", timeout=15, interval=0.5)
    finally:
        DAEMON_JSON.write_text(original)
        sh("dkvm", "install")


def test_version_and_help(docker):
    assert sh("dkvm", "version").stdout.startswith("dkvm ")
    assert "install" in sh("dkvm", "--help").stdout


def test_doctor_reports_this_host(docker):
    out = sh("dkvm", "doctor", check=False)
    assert out.returncode == 0, out.stdout
    assert "[ok  ] dockerd knows the dkvm runtime" in out.stdout
    if shutil.which("podman"):
        assert "[ok  ] Podman knows the dkvm runtime" in out.stdout
    assert "net.ipv4.ip_forward" in out.stdout and "rp_filter" in out.stdout
    if os.path.isdir("/sys/module/kvm_pvm"):
        assert "nested PVM" in out.stdout and "TCG" in out.stdout


def test_install_removes_unused_payloads_of_other_builds_only(busybox_image):
    """An upgrade leaves the old build's payload behind: `install` removes it, unless a
    running container still has it mounted (here: a mount namespace holding it)."""
    old, used = Path("/var/lib/dkvm/00000000000000aa"), Path("/var/lib/dkvm/00000000000000bb")
    for payload in (old, used):
        (payload / "python").mkdir(parents=True, exist_ok=True)
        (payload / "python" / "lib.so").write_text("x")
        os.chmod(payload / "python", 0o555)
    holder = subprocess.Popen(["unshare", "-m", "sh", "-c",
                               f"mount --bind {used} /mnt && echo held && exec sleep 120"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = sh("dkvm", "install")
        assert "removed 1 unused payload(s)" in out.stdout, out.stdout
        assert not old.exists() and (used / "python" / "lib.so").exists()
        current = out.stdout.split("payload at ")[1].split()[0]
        assert os.path.isfile(os.path.join(current, "BUILD_ID"))
        assert sh("docker", "run", "--rm", "--runtime=dkvm", busybox_image, "true",
                  check=False).returncode == 0
    finally:
        holder.kill()
        holder.wait()
        for payload in (old, used):
            subprocess.run(["rm", "-rf", str(payload)], check=False)


@pytest.fixture
def other_engines():
    if not (shutil.which("podman") and shutil.which("containerd")
            and CONTAINERD_CONFIG.exists()):
        pytest.skip("needs podman and containerd (with its config.toml) on this host")


def test_containerd_loads_the_runtime_class_install_wrote(other_engines, tmp_path):
    """A containerd of its own (own socket, root and state) reads the config: its CRI
    plugin starts with the dkvm runtime class, and runc still the default."""
    assert "registered in /etc/containerd/config.toml" in \
        sh("dkvm", "install", "--engine", "containerd").stdout
    log = tmp_path / "containerd.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen(
            ["containerd", "--config", str(CONTAINERD_CONFIG), "--address",
             str(tmp_path / "sock"), "--root", str(tmp_path / "root"), "--state",
             str(tmp_path / "state")], stdout=out, stderr=subprocess.STDOUT)
    try:
        text = poll(log.read_text, lambda t: "Start cri plugin" in t
                    or "failed to load plugin io.containerd.grpc.v1.cri" in t, timeout=30)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    assert "failed to load plugin io.containerd.grpc.v1.cri" not in text, text
    started = next(line for line in text.splitlines() if "Start cri plugin" in line)
    assert "DefaultRuntimeName:runc" in started
    assert "dkvm:{Type:io.containerd.runc.v2" in started
    assert "BinaryName:/usr/local/bin/dkvm-runtime" in started


def test_uninstall_from_podman_and_containerd_gives_their_files_back(other_engines):
    registered = CONTAINERD_CONFIG.read_text()
    assert "runtimes.dkvm]" in registered and PODMAN_DROP_IN.exists()
    try:
        out = sh("dkvm", "uninstall", "--engine", "podman,containerd")
        assert "removed /etc/containers/containers.conf.d/dkvm.conf" in out.stdout
        after = CONTAINERD_CONFIG.read_text()
        assert "dkvm" not in after
        assert registered.startswith(after)                  # only DKVM's block went
        assert not PODMAN_DROP_IN.exists()
        assert os.path.exists("/usr/local/bin/dkvm-runtime")  # the files stay
        unknown = sh("podman", "--runtime", "dkvm", "info", check=False)
        assert unknown.returncode != 0
        assert "dkvm" in unknown.stderr
    finally:
        sh("dkvm", "install", "--engine", "podman,containerd")
    assert CONTAINERD_CONFIG.read_text() == registered
