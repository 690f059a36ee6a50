"""`dkvm install` keeps the rest of daemon.json, backs it up, and is idempotent."""
import json
import os
import subprocess
from pathlib import Path

from dockerutil import sh
from waiting import wait_until

DAEMON_JSON = Path("/etc/docker/daemon.json")
BACKUP = Path("/etc/docker/daemon.json.dkvm-backup")


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
