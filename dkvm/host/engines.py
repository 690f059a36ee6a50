"""The container engines DKVM serves, each in one place: how it names the network
namespace it gives a container, and where it looks for runtimes (what `dkvm install`
edits). Docker today; Podman and containerd join here."""
import os
import stat

from dkvm.errors import DkvmError

RUNTIME_NAME = "dkvm"
NETNS_DIRS = ("/run/netns", "/var/run/netns")      # where `ip netns`, CNI and engines keep them
VERIFY_TIMEOUT = 15


def is_own_namespace(path, own="/proc/self/ns/net"):
    """Whether the namespace file at `path` is this process's own (the engine's: the
    host's). One that cannot be read is left to runc to refuse."""
    try:
        theirs, ours = os.stat(path), os.stat(own)
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


class Docker:
    name = "docker"
    # what a container gets without --cap-add/--cap-drop: what the user dropped is
    # what is missing from it
    default_capabilities = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER",
                            "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID",
                            "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                            "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")
    daemon_json = "/etc/docker/daemon.json"
    pidfile = "/var/run/docker.pid"

    # --- create: what the config's namespaces mean
    def check_network_namespace(self, linux):
        """The VM takes over the container's interfaces: it needs a network namespace
        made for the container. dockerd asks runc to create one (no path); Podman, CRI
        (containerd under Kubernetes) and `ctr --with-ns` make it themselves and give
        its path under /run/netns. Any other path is the host's namespace (dockerd
        names it .../netns/default) or another container's (/proc/PID/ns/net:
        --network container:NAME); so is a /run/netns path to the host's own.
        Returns the path of an engine's namespace ("" for one runc makes)."""
        namespaces = linux.get("namespaces") or []
        net = [ns for ns in namespaces if ns.get("type") == "network"]
        path = (net[0].get("path") or "") if net else ""
        path = os.path.normpath(path) if path else ""
        if not net or os.path.basename(path) == "default" or (path and is_own_namespace(path)):
            raise DkvmError("--network host is not supported by DKVM: the VM needs a network "
                            "namespace of its own (use a bridge network, or --network none)")
        if path and os.path.dirname(path) not in NETNS_DIRS:
            raise DkvmError("--network container:NAME is not supported by DKVM: the VM needs "
                            "a network namespace of its own (use a bridge network, or "
                            f"--network none); a namespace given by path must be in "
                            f"{' or '.join(NETNS_DIRS)}, not {path}")
        return path

    # --- install: daemon.json's runtimes
    def register(self, runtime_path, runtime_args):
        entry = {"path": runtime_path, "runtimeArgs": list(runtime_args)}
        self.update_daemon_json(
            lambda cfg: cfg.setdefault("runtimes", {}).__setitem__(RUNTIME_NAME, entry))
        if not self.reload():
            return False
        self.verify_registered(True)
        return True

    def unregister(self):
        def drop(cfg):
            cfg.get("runtimes", {}).pop(RUNTIME_NAME, None)
            if cfg.get("runtimes") == {}:
                del cfg["runtimes"]
        if os.path.exists(self.daemon_json):
            self.update_daemon_json(drop)
        if self.reload():
            self.verify_registered(False)

    def update_daemon_json(self, change):
        """Apply `change` to daemon.json, keeping every other setting; back it up first."""
        import json                 # here: the runtime's exec path imports this module
        cfg, original = {}, None
        if os.path.exists(self.daemon_json):
            with open(self.daemon_json) as f:
                original = f.read()
            try:
                cfg = json.loads(original) if original.strip() else {}
            except json.JSONDecodeError as err:
                raise DkvmError(f"{self.daemon_json} is not valid JSON ({err}); fix it first") \
                    from None
        change(cfg)
        text = json.dumps(cfg, indent=2) + "\n"
        if text == original:
            return
        os.makedirs(os.path.dirname(self.daemon_json), exist_ok=True)
        if original is not None:
            replace_file(self.daemon_json + ".dkvm-backup", original, like=self.daemon_json)
        replace_file(self.daemon_json, text, like=self.daemon_json)

    def reload(self):
        """SIGHUP makes dockerd reload its runtimes; False when no dockerd runs."""
        import signal
        try:
            with open(self.pidfile) as f:
                pid = int(f.read().strip())
            os.kill(pid, signal.SIGHUP)
            return True
        except (OSError, ValueError):
            return False

    def verify_registered(self, expected):
        import subprocess
        import time
        deadline = time.monotonic() + VERIFY_TIMEOUT
        while time.monotonic() < deadline:
            out = subprocess.run(["docker", "info", "--format", "{{json .Runtimes}}"],
                                 capture_output=True, text=True, timeout=VERIFY_TIMEOUT)
            if out.returncode == 0 and (f'"{RUNTIME_NAME}"' in out.stdout) == expected:
                return
            time.sleep(0.5)
        state = "registered" if expected else "unregistered"
        raise DkvmError(f"dockerd did not show the runtime {state} in `docker info` within "
                        f"{VERIFY_TIMEOUT}s; check `journalctl -u docker` or dockerd's log")


DOCKER = Docker()


def replace_file(path, text, like=None):
    """Write `path` whole or not at all: a temporary file of a unique name beside it,
    with the mode and owner of `like` (when it exists), synced, then renamed over it."""
    import tempfile
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if like and os.path.exists(like):
                info = os.stat(like)
                os.fchmod(f.fileno(), stat.S_IMODE(info.st_mode))
                os.fchown(f.fileno(), info.st_uid, info.st_gid)
            else:
                os.fchmod(f.fileno(), 0o644)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
