"""Where each engine looks for runtimes, and what `dkvm install` writes there: Docker's
daemon.json, a drop-in file for Podman, a marked block in containerd's config.toml.
Each registration changes only what is DKVM's, backs the file up before editing it,
and `unregister` takes exactly that out again."""
import os
import shutil
import stat

from dkvm.errors import DkvmError
from dkvm.host.engine_toml import (CONFIG, add_containerd_runtime, containerd_runtime_section,
                                   remove_containerd_runtime, toml_string)
from dkvm.host.engines import RUNTIME_NAME

VERIFY_TIMEOUT = 15


class DockerRegistration:
    """daemon.json's `runtimes`; dockerd reloads it on SIGHUP."""
    name = "docker"
    daemon_json = "/etc/docker/daemon.json"
    pidfile = "/var/run/docker.pid"

    def present(self):
        return bool(shutil.which("dockerd")) or os.path.isfile(self.daemon_json)

    def register(self, runtime_path, runc):
        entry = {"path": runtime_path, "runtimeArgs": [f"--dkvm-runc={runc}"]}
        self.update_daemon_json(
            lambda cfg: cfg.setdefault("runtimes", {}).__setitem__(RUNTIME_NAME, entry))
        if not self.reload():
            return f"dockerd is not running; runtime '{RUNTIME_NAME}' is registered for " \
                "its next start"
        self.verify_registered(True)
        return f"registered with dockerd: docker run --runtime={RUNTIME_NAME} IMAGE"

    def unregister(self):
        def drop(cfg):
            cfg.get("runtimes", {}).pop(RUNTIME_NAME, None)
            if cfg.get("runtimes") == {}:
                del cfg["runtimes"]
        if os.path.exists(self.daemon_json):
            self.update_daemon_json(drop)
        if self.reload():
            self.verify_registered(False)
        return f"removed from {self.daemon_json}"

    def check(self):
        import subprocess
        if not shutil.which("docker"):
            return "fail", "docker CLI not found", "apt-get install docker.io"
        out = subprocess.run(["docker", "info", "--format", "{{json .Runtimes}}"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return "fail", "dockerd is not reachable", "start dockerd (systemctl start docker)"
        if f'"{RUNTIME_NAME}"' not in out.stdout:
            return "fail", "the dkvm runtime is not registered with dockerd", \
                "dkvm install --engine docker"
        return "ok", "dockerd knows the dkvm runtime", ""

    def update_daemon_json(self, change):
        """Apply `change` to daemon.json, keeping every other setting; back it up first."""
        import json
        cfg, original = {}, read_text(self.daemon_json)
        if original is not None:
            try:
                cfg = json.loads(original) if original.strip() else {}
            except json.JSONDecodeError as err:
                raise DkvmError(f"{self.daemon_json} is not valid JSON ({err}); fix it first") \
                    from None
        change(cfg)
        text = json.dumps(cfg, indent=2) + "\n"
        if text != original:
            os.makedirs(os.path.dirname(self.daemon_json), exist_ok=True)
            write_with_backup(self.daemon_json, text, original)

    def reload(self):
        """False when no dockerd runs."""
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


MARK = "# Written by `dkvm install`; `dkvm uninstall` removes it."


class PodmanRegistration:
    """A drop-in of Podman's own (containers.conf.d), read on every podman command: no
    edit of the user's containers.conf, and nothing to reload. Podman passes a runtime
    no arguments, so dkvm-runtime finds runc in PATH."""
    name = "podman"
    drop_in = "/etc/containers/containers.conf.d/dkvm.conf"

    def present(self):
        return bool(shutil.which("podman"))

    def register(self, runtime_path, runc):
        text = podman_drop_in(runtime_path)
        original = read_text(self.drop_in)
        if original != text:
            os.makedirs(os.path.dirname(self.drop_in), exist_ok=True)
            # a file of the user's by that name is kept aside, and put back by uninstall
            write_with_backup(self.drop_in, text, None if is_ours(original) else original)
        return f"registered with Podman ({self.drop_in}): podman run --runtime " \
            f"{RUNTIME_NAME} IMAGE"

    def unregister(self):
        if is_ours(read_text(self.drop_in)):
            os.remove(self.drop_in)
        backup = self.drop_in + BACKUP_SUFFIX
        if os.path.exists(backup):
            os.replace(backup, self.drop_in)
        return f"removed {self.drop_in}"

    def check(self):
        import tomllib
        text = read_text(self.drop_in)
        if not is_ours(text):
            return "fail", "the dkvm runtime is not registered with Podman", \
                "dkvm install --engine podman"
        paths = tomllib.loads(text).get("engine", {}).get("runtimes", {}).get(RUNTIME_NAME, [])
        if not any(os.access(path, os.X_OK) for path in paths):
            return "fail", f"{self.drop_in} names no executable dkvm-runtime", \
                "dkvm install --engine podman"
        return "ok", f"Podman knows the dkvm runtime ({self.drop_in})", ""


def podman_drop_in(runtime_path):
    return f'{MARK}\n[engine.runtimes]\n{RUNTIME_NAME} = ["{toml_string(runtime_path)}"]\n'


class ContainerdRegistration:
    """A runtime class in config.toml's CRI section, runc's shim with dkvm-runtime as its
    binary: Kubernetes picks it with a RuntimeClass whose handler is `dkvm`. The block
    DKVM adds is marked, and the file is checked to parse to it before it is written.
    containerd reads its config only when it starts."""
    name = "containerd"
    config = CONFIG

    def present(self):
        return bool(shutil.which("containerd")) and os.path.isfile(self.config)

    def register(self, runtime_path, runc):
        original = read_text(self.config)
        text = add_containerd_runtime(original, runtime_path)
        if text != original:
            os.makedirs(os.path.dirname(self.config), exist_ok=True)
            write_with_backup(self.config, text, original)
        return f"registered in {self.config} as runtime class '{RUNTIME_NAME}'; restart " \
            "containerd to load it (systemctl restart containerd)"

    def unregister(self):
        original = read_text(self.config)
        if original is None:
            return f"{self.config} does not exist"
        text = remove_containerd_runtime(original)
        if text is None:
            os.remove(self.config)
        elif text != original:
            write_with_backup(self.config, text, original)
        return f"removed from {self.config}; restart containerd to unload it"

    def check(self):
        original = read_text(self.config)
        section = containerd_runtime_section(original or "")
        if section is None or section.get("options", {}).get("BinaryName") is None:
            return "fail", f"no '{RUNTIME_NAME}' runtime class in {self.config}", \
                "dkvm install --engine containerd"
        binary = section["options"]["BinaryName"]
        if not os.access(binary, os.X_OK):
            return "fail", f"{self.config}: BinaryName {binary} is not executable", \
                "dkvm install --engine containerd"
        stale = started_before(os.stat(self.config).st_mtime, "containerd", self.config)
        if stale:
            return "warn", f"containerd (pid {stale}) started before {self.config} was " \
                "changed: it does not know the dkvm runtime class yet", \
                "systemctl restart containerd"
        return "ok", f"containerd's config has the dkvm runtime class ({self.config})", ""


# --- shared by the registrations

BACKUP_SUFFIX = ".dkvm-backup"


def is_ours(text):
    return text is not None and text.startswith(MARK + "\n")


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_with_backup(path, text, original):
    """`path` replaced whole by `text`; what was there (if anything) kept beside it."""
    if original is not None:
        replace_file(path + BACKUP_SUFFIX, original, like=path)
    replace_file(path, text, like=path)


def started_before(mtime, program, config):
    """The pid of a running `program` started before `mtime` that reads `config` (one
    started with another --config reads another file); 0 if none."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [arg.decode(errors="replace") for arg in f.read().split(b"\0") if arg]
            with open(f"/proc/{pid}/stat") as f:
                start = boot + int(f.read().rsplit(")", 1)[1].split()[19]) / ticks
        except (OSError, IndexError, ValueError):
            continue
        if not argv or os.path.basename(argv[0]) != program:
            continue
        named = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
        named += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
        if (not named or config in named) and start < mtime:
            return int(pid)
    return 0


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


ENGINES = {engine.name: engine for engine in
           (DockerRegistration(), PodmanRegistration(), ContainerdRegistration())}


def choose_engines(names):
    """The engines named (`--engine`, repeatable or comma-separated), or those on the
    host when none is."""
    wanted = [n.strip() for name in names for n in name.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in ENGINES]
    if unknown:
        raise DkvmError(f"--engine {unknown[0]}: not an engine dkvm knows "
                        f"(it knows {', '.join(ENGINES)})")
    if wanted:
        return [ENGINES[n] for n in dict.fromkeys(wanted)]
    found = [engine for engine in ENGINES.values() if engine.present()]
    if not found:
        raise DkvmError("no container engine found (docker, podman or containerd); "
                        "install one, or name it with --engine")
    return found
