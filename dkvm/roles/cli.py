"""dkvm: the host command. `install` registers the runtime with Docker."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import time

from dkvm import __version__, paths
from dkvm.errors import DkvmError

DAEMON_JSON = "/etc/docker/daemon.json"
DOCKER_PIDFILE = "/var/run/docker.pid"
RUNTIME_NAME = "dkvm"
VERIFY_TIMEOUT = 15


def main(argv):
    parser = argparse.ArgumentParser(
        prog="dkvm", description="Run container images as virtual machines: "
        "docker run --runtime=dkvm IMAGE")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    inst = sub.add_parser("install", help="install dkvm and register the runtime with Docker")
    inst.add_argument("--bin-dir", default="/usr/local/bin")
    inst.add_argument("--runc", default="", help="path of the real runc (default: found in PATH)")
    uninst = sub.add_parser("uninstall", help="unregister the runtime and remove dkvm")
    uninst.add_argument("--bin-dir", default="/usr/local/bin")
    sub.add_parser("version", help="print the version and build id")
    sub.add_parser("kernels", help="list the guest kernels this build carries")
    sub.add_parser("doctor", help="check what on this host stops or slows DKVM")
    args = parser.parse_args(argv[1:])
    if args.command == "install":
        return install(args.bin_dir, args.runc)
    if args.command == "uninstall":
        return uninstall(args.bin_dir)
    if args.command == "version":
        print(f"dkvm {__version__} build {build_id()}")
        return 0
    if args.command == "doctor":
        from dkvm.doctor import run_doctor
        return run_doctor()
    if args.command == "kernels":
        from dkvm.host import ensure_payload, payload_kernels
        for dist, release in payload_kernels(ensure_payload()).items():
            print(f"{dist}/{release}")
        return 0
    parser.print_help()
    return 0


def build_id():
    import zipfile
    from dkvm.host import archive_path
    with zipfile.ZipFile(archive_path()) as zf:
        return zf.read("payload/BUILD_ID").decode().strip()


def install(bin_dir, runc):
    from dkvm.host import archive_path, ensure_payload, find_runc, prune_payloads
    runc = find_runc(runc)
    source = archive_path()
    target = os.path.join(bin_dir, "dkvm.pyz")
    os.makedirs(bin_dir, exist_ok=True)
    if os.path.realpath(source) != os.path.realpath(target):
        tmp = target + ".tmp"
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    for name in ("dkvm-runtime", "dkvm"):
        link = os.path.join(bin_dir, name)
        if os.path.islink(link) or os.path.exists(link):
            os.remove(link)
        os.symlink("dkvm.pyz", link)
    payload = ensure_payload(target)
    print(f"dkvm: payload at {payload}")
    removed = prune_payloads(keep=os.path.basename(payload))
    if removed:
        print(f"dkvm: removed {len(removed)} unused payload(s) of other builds")
    entry = {"path": os.path.join(bin_dir, "dkvm-runtime"), "runtimeArgs": [f"--dkvm-runc={runc}"]}
    update_daemon_json(lambda cfg: cfg.setdefault("runtimes", {}).__setitem__(RUNTIME_NAME, entry))
    if reload_dockerd():
        verify_registered(True)
        print(f"dkvm: runtime '{RUNTIME_NAME}' registered: docker run --runtime={RUNTIME_NAME} IMAGE")
    else:
        print(f"dkvm: dockerd is not running; runtime '{RUNTIME_NAME}' is registered in "
              f"{DAEMON_JSON} for its next start")
    return 0


def uninstall(bin_dir):
    def drop(cfg):
        cfg.get("runtimes", {}).pop(RUNTIME_NAME, None)
        if cfg.get("runtimes") == {}:
            del cfg["runtimes"]
    if os.path.exists(DAEMON_JSON):
        update_daemon_json(drop)
    if reload_dockerd():
        verify_registered(False)
    for name in ("dkvm-runtime", "dkvm", "dkvm.pyz"):
        path = os.path.join(bin_dir, name)
        if os.path.lexists(path):
            os.remove(path)
    if os.path.isdir(paths.HOST_STATE_DIR):
        from dkvm.host import remove_tree
        remove_tree(paths.HOST_STATE_DIR)
    print("dkvm: uninstalled")
    return 0


def update_daemon_json(change):
    """Apply `change` to daemon.json, keeping every other setting; back it up first."""
    cfg, original = {}, None
    if os.path.exists(DAEMON_JSON):
        with open(DAEMON_JSON) as f:
            original = f.read()
        try:
            cfg = json.loads(original) if original.strip() else {}
        except json.JSONDecodeError as err:
            raise DkvmError(f"{DAEMON_JSON} is not valid JSON ({err}); fix it first") from None
    change(cfg)
    text = json.dumps(cfg, indent=2) + "\n"
    if text == original:
        return
    os.makedirs(os.path.dirname(DAEMON_JSON), exist_ok=True)
    if original is not None:
        with open(DAEMON_JSON + ".dkvm-backup", "w") as f:
            f.write(original)
    tmp = DAEMON_JSON + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, DAEMON_JSON)


def reload_dockerd():
    """SIGHUP makes dockerd reload its runtimes; False when no dockerd runs."""
    try:
        with open(DOCKER_PIDFILE) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGHUP)
        return True
    except (OSError, ValueError):
        return False


def verify_registered(expected):
    deadline = time.monotonic() + VERIFY_TIMEOUT
    while time.monotonic() < deadline:
        out = subprocess.run(["docker", "info", "--format", "{{json .Runtimes}}"],
                             capture_output=True, text=True)
        if out.returncode == 0 and (f'"{RUNTIME_NAME}"' in out.stdout) == expected:
            return
        time.sleep(0.5)
    state = "registered" if expected else "unregistered"
    raise DkvmError(f"dockerd did not show the runtime {state} in `docker info` within "
                    f"{VERIFY_TIMEOUT}s; check `journalctl -u docker` or dockerd's log")
