"""Running docker for the end-to-end tests: every call has a time bound."""
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

from waiting import poll, wait_until

RUN_TIMEOUT = 240
# every kernel the build carries: a folder of kernels/ with a recipe
KERNELS = sorted(path.parent.name for path in
                 (Path(__file__).resolve().parents[2] / "kernels").glob("*/recipe.toml"))
BUSYBOX = "dkvm-test-busybox"
STATIC = "dkvm-test-static"
DEBIAN = "dkvm-test-debian"
SYSTEM = "dkvm-test-system"        # Debian with systemd and Docker
KERNEL = "dkvm-test-kernel"        # Debian with kernels of its own (DKVM_KERNEL=image)
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
          "app:x:1000:1000:app:/home/app:/bin/sh\n")
GROUP = "root:x:0:\nnogroup:x:65534:\napp:x:1000:\nextra:x:2000:app\n"


def sh(*args, timeout=RUN_TIMEOUT, check=True, input=None):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check,
                          input=input)


def docker_run(runtime, *args, timeout=RUN_TIMEOUT, input=None):
    """`docker run --rm --runtime=R ARGS...`; every run has a bound, and a run that
    overstays it is removed, not left behind."""
    name = f"dkvm-run-{uuid.uuid4().hex[:12]}"
    try:
        return sh("docker", "run", "--rm", f"--runtime={runtime}", "--name", name, *args,
                  timeout=timeout, check=False, input=input)
    except subprocess.TimeoutExpired:
        sh("docker", "rm", "-f", name, check=False, timeout=60)
        raise


DKVM_LINE = re.compile(r"dkvm(\[[^\]]*\])?: ")


def dkvm_lines(text):
    """The lines DKVM wrote (`dkvm: ...` or `dkvm[role id]: ...`)."""
    return [line for line in text.splitlines() if DKVM_LINE.search(line)]


def logs(name):
    return sh("docker", "logs", name, check=False).stdout


PATH_ENV = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def busybox_tree(root):
    """A static busybox with its applets, and the test users and groups."""
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in sh("/bin/busybox", "--list").stdout.split():
        if applet != "busybox":
            os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)


def image_exists(tag):
    return sh("docker", "image", "inspect", tag, check=False).returncode == 0


def docker_import(tree, tag, changes=()):
    tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
    cmd = ["docker", "import"] + [f"--change={c}" for c in changes] + ["-", tag]
    subprocess.run(cmd, stdin=tar.stdout, check=True, capture_output=True, timeout=600)
    tar.wait(timeout=60)


def with_stop_signal(base, tag, stop_signal):
    """`base` with a STOPSIGNAL (`docker import` cannot set one)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "Dockerfile").write_text(f"FROM {base}\nSTOPSIGNAL {stop_signal}\n")
        sh("docker", "build", "-q", "-t", tag, tmp)


def resize_and_check(child, old, new, timeout=60):
    """Resize the pexpect terminal and ask `stty size` until the guest reports `new`:
    the resize travels host -> container -> guest asynchronously."""
    child.setwinsize(*new)

    def reports_new_size():
        child.sendline("stty size")
        return child.expect(["%d %d" % new, "%d %d" % old]) == 0
    wait_until(reports_new_size, f"the guest terminal to take the size {new}",
               timeout=timeout, interval=0.1)


def interrupt_foreground_sleep(child, container, timeout=60):
    """Start `sleep 1000` at the shell in `child`, wait (bounded) until the guest runs
    it, seen through `docker exec`, then press Ctrl-C."""
    child.sendline("sleep 1000")
    wait_until(lambda: "sleep 1000" in sh("docker", "exec", container, "ps", "-o", "args",
                                          check=False).stdout,
               "the foreground sleep to start", timeout)
    child.sendcontrol("c")


# a workload that serves one page, `{text}`, on port 8080 (busybox httpd)
HTTPD = "mkdir -p /www && echo {text} > /www/index.html && exec httpd -f -p 8080 -h /www"


def http_get(ip, timeout, port=8080):
    """The last line of the page a server at `ip` serves, from the host: HTTP/1.0 over
    a socket (busybox's httpd answers it); waits, bounded, for the server to listen."""
    def fetch():
        try:
            with socket.create_connection((ip, port), timeout=5) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
            if not data:    # docker-proxy took the connection before the server listened
                return ConnectionResetError("an empty reply")
            return data.decode().rsplit("\n", 2)[-2]
        except OSError as err:
            return err
    page = poll(fetch, lambda value: not isinstance(value, OSError), timeout, interval=0.5)
    if isinstance(page, OSError):
        raise page
    return page


def load_into_engine(image, load_command):
    """Docker's `image`, as `docker save` writes it, loaded into another engine by
    `load_command` (which reads the archive on stdin)."""
    saved = subprocess.run(["docker", "save", image], capture_output=True, check=True,
                           timeout=RUN_TIMEOUT).stdout
    subprocess.run(load_command, input=saved, capture_output=True, check=True,
                   timeout=RUN_TIMEOUT)


def host_vm_processes():
    out = sh("pgrep", "-f", "qemu-system-x86_64|/.dkvm/qemu/virtiofsd", check=False)
    return out.stdout.split()


def leak_snapshot():
    mounts = [line for line in open("/proc/mounts") if "dkvm" in line]
    state_dir = sorted(p for p in glob.glob("/var/lib/dkvm/.*") if not p.endswith(".lock"))
    shm = sorted(glob.glob("/dev/shm/*"))
    taps = sorted(os.listdir("/sys/class/net"))
    return {"processes": host_vm_processes(), "mounts": mounts, "state": state_dir,
            "shm": shm, "net": taps}
