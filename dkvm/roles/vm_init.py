"""dkvm-vm-init: PID 1 in the guest. It rebuilds the container's world in the VM,
runs the workload as the container would have, reports its exit status to the
container side and powers the VM off."""
import fcntl
import os
import select
import signal
import sys
import time

from dkvm import guestos, paths, wire
from dkvm.plan import Plan

PORT_WAIT = 10
ACK_WAIT = 5
FATAL_STATUS = 125
CONSOLE = "/dev/hvc0"


def main(argv):
    control = None
    try:
        setup_filesystems()
        with open(paths.PLAN_FILE) as f:
            plan = Plan.from_json(f.read())
        ports = find_ports(wanted=(paths.PORT_CONTROL,) if plan.terminal else
                           (paths.PORT_CONTROL, paths.PORT_STDIN, paths.PORT_STDOUT,
                            paths.PORT_STDERR))
        control = os.open(ports[paths.PORT_CONTROL], os.O_RDWR | os.O_CLOEXEC)
        apply_identity(plan)
        status = run_workload(plan, ports, control)
    except Exception as err:  # PID 1 must never die with a traceback: report and stop
        log(repr(err))
        if control is not None:
            os.write(control, wire.encode(wire.ERROR, {"message": f"guest init failed: {err}"}))
        status = FATAL_STATUS
    finish(control, status)


def log(message):
    """To the kernel log: seen with DKVM_KERNEL_DEBUG=1, never in the workload's output."""
    print(f"dkvm-vm-init: {message}", file=sys.stderr, flush=True)


def setup_filesystems():
    """The kernel filesystems a container gets from runc, mounted over the container's
    own (which virtiofs shows but belong to the container side)."""
    mounts = [
        ("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"]),
        ("sysfs", "/sys", "sysfs", ["nosuid", "nodev", "noexec"]),
        ("devtmpfs", "/dev", "devtmpfs", ["nosuid", "mode=755"]),
        ("devpts", "/dev/pts", "devpts", ["nosuid", "noexec", "gid=5", "mode=620",
                                          "ptmxmode=666"]),
        ("mqueue", "/dev/mqueue", "mqueue", ["nosuid", "nodev", "noexec"]),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", ["nosuid", "nodev", "noexec"]),
    ]
    for source, target, fstype, options in mounts:
        os.makedirs(target, exist_ok=True)
        guestos.mount(source, target, fstype, *guestos.mount_options(options))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        if not os.path.lexists(f"/dev/{name}"):
            os.symlink(target, f"/dev/{name}")


def apply_identity(plan):
    os.makedirs("/dev/shm", exist_ok=True)
    guestos.mount("shm", "/dev/shm", "tmpfs", *guestos.mount_options(
        ["nosuid", "nodev", "noexec", "mode=1777", f"size={plan.dev_shm_size}"]))
    guestos.set_uts_names(plan.hostname, plan.domainname)
    for name, value in plan.sysctl.items():
        with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
            f.write(value)
    guestos.interface_up("lo")
    for mount in plan.tmpfs:
        flags, data = guestos.mount_options(mount["options"])
        os.makedirs(mount["destination"], exist_ok=True)
        guestos.mount("tmpfs", mount["destination"], "tmpfs", flags, data)


def find_ports(wanted):
    """virtio-serial ports by name (no udev in the guest: read sysfs)."""
    deadline = time.monotonic() + PORT_WAIT
    while True:
        found = {}
        base = "/sys/class/virtio-ports"
        for dev in os.listdir(base) if os.path.isdir(base) else []:
            try:
                with open(f"{base}/{dev}/name") as f:
                    found[f.read().strip()] = f"/dev/{dev}"
            except OSError:
                continue
        if all(name in found and os.path.exists(found[name]) for name in wanted):
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial ports missing: {sorted(set(wanted) - set(found))}")
        time.sleep(0.02)


def run_workload(plan, ports, control):
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    console, stdio = None, None
    if plan.terminal:
        console = os.open(CONSOLE, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        if plan.winsize:
            guestos.set_winsize(console, *plan.winsize)
    else:
        stdio = open_stdio_ports(ports)
    pid = spawn(plan, stdio)
    if stdio:
        for fd in stdio:
            os.close(fd)
    # The container side holds stdin back until now: this guest kernel drops what
    # arrives on a port nobody has open.
    os.write(control, wire.encode(wire.HELLO))
    decoder = wire.Decoder()
    while True:
        status = reap(pid)
        if status is not None:
            return status
        ready, _, _ = select.select([control, wake_r], [], [], 1.0)
        if wake_r in ready:
            os.read(wake_r, 4096)
        if control in ready:
            for frame in wire.feed_tolerant(decoder, os.read(control, 65536), log):
                if frame.type == wire.SIGNAL:
                    try:
                        os.kill(pid, frame.json()["signal"])
                    except ProcessLookupError:
                        pass
                elif frame.type == wire.RESIZE and console is not None:
                    size = frame.json()
                    guestos.set_winsize(console, size["rows"], size["cols"])


def reap(workload_pid):
    """Reap every exited child (PID 1 adopts orphans); the workload's status or None."""
    status = None
    while True:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == workload_pid:
            code = os.waitstatus_to_exitcode(wstatus)
            status = 128 - code if code < 0 else code


def open_stdio_ports(ports):
    return (os.open(ports[paths.PORT_STDIN], os.O_RDONLY | os.O_CLOEXEC),
            os.open(ports[paths.PORT_STDOUT], os.O_WRONLY | os.O_CLOEXEC),
            os.open(ports[paths.PORT_STDERR], os.O_WRONLY | os.O_CLOEXEC))


def spawn(plan, stdio):
    """Start the workload as PID 1 of its own PID namespace, as runc does: it sees
    itself as PID 1, gets PID 1's signal semantics, and reaps its own orphans."""
    env = dict(item.partition("=")[::2] for item in plan.env)
    env.setdefault("HOME", home_of(plan.uid))
    guestos.unshare(guestos.CLONE_NEWPID)
    pid = os.fork()
    if pid:
        return pid
    try:
        guestos.unshare(guestos.CLONE_NEWNS)
        guestos.make_mounts_private()
        guestos.mount("proc", "/proc", "proc", *guestos.mount_options(["nosuid", "nodev", "noexec"]))
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.setsid()
        if plan.terminal:
            tty = os.open(CONSOLE, os.O_RDWR)
            fcntl.ioctl(tty, guestos.TIOCSCTTY, 0)
            stdio = (tty, tty, tty)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        os.setgroups(list(dict.fromkeys(plan.additional_gids)))
        os.setgid(plan.gid)
        os.setuid(plan.uid)
        os.chdir(plan.cwd)
        program = resolve(plan.args[0], env.get("PATH", ""))
        os.execve(program, plan.args, env)
    except ExecError as err:
        os.write(2, f"dkvm: exec: {err.message}\n".encode())
        os._exit(err.status)
    except BaseException as err:
        os.write(2, f"dkvm: cannot start the workload: {err}\n".encode())
        os._exit(126 if isinstance(err, PermissionError) else 127)


def home_of(uid, passwd="/etc/passwd"):
    """HOME as runc sets it when the image and `-e` leave it unset."""
    try:
        with open(passwd) as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[2] == str(uid):
                    return fields[5] or "/"
    except OSError:
        pass
    return "/"


class ExecError(Exception):
    def __init__(self, message, status):
        super().__init__(message)
        self.message, self.status = message, status


def resolve(name, search_path):
    """Find the program as runc does: a name with a slash is a path, else $PATH."""
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in search_path.split(":")]
    for cand in candidates:
        if os.path.isfile(cand):
            if not os.access(cand, os.X_OK):
                raise ExecError(f'"{name}": permission denied', 126)
            return cand
    if "/" in name:
        if os.path.isdir(name):
            raise ExecError(f'"{name}": is a directory', 126)
        raise ExecError(f'"{name}": stat {name}: no such file or directory', 127)
    raise ExecError(f'"{name}": executable file not found in $PATH', 127)


def finish(control, status):
    """End every process (as the end of PID 1 does in a container), report the status,
    wait for the container side to take it, and power off."""
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    reap(None)
    os.sync()
    if control is not None:
        os.write(control, wire.encode(wire.EXIT, {"status": status}))
        wait_for_ack(control)
    guestos.power_off()


def wait_for_ack(control):
    decoder = wire.Decoder()
    deadline = time.monotonic() + ACK_WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([control], [], [], max(0, deadline - time.monotonic()))
        frames = wire.feed_tolerant(decoder, os.read(control, 65536), log) if ready else []
        if any(f.type == wire.EXIT_ACK for f in frames):
            return
