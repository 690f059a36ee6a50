"""dkvm-vm-init: PID 1 in the guest. It rebuilds the container's world in the VM,
runs the workload as the container would have, reports its exit status to the
container side and powers the VM off.

The guest imports no module it can do without: each costs under TCG. (`_signal`,
`_socket`, `lightjson`: the standard modules around them pull in enum and re.)"""
import _signal
import fcntl
import os
import select
import sys
import time

from dkvm import dns, guestos, net_guest, paths, terminal, wire
from dkvm.guest_exec import ExecSession
from dkvm.guest_process import become_and_exec, workload_env
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
            write_all(control, wire.encode(wire.ERROR, {"message": f"guest init failed: {err}"}))
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
    guestos.write_sysctls(plan.sysctl)
    guestos.interface_up("lo")
    net_guest.run_steps(plan.network_setup)
    if plan.kernel_lib_modules:
        mount_kernel_modules(plan.kernel)
    for mount in plan.tmpfs:
        flags, data = guestos.mount_options(mount["options"])
        os.makedirs(mount["destination"], exist_ok=True)
        guestos.mount("tmpfs", mount["destination"], "tmpfs", flags, data)


def mount_kernel_modules(kernel):
    """DKVM_KERNEL_MOUNT_LIB_MODULES: the payload's modules for this guest kernel, with
    depmod's indexes, read-only at /lib/modules, so that `modprobe` and the kernel's
    own module requests (crypto, netfilter extensions) find them. The image's
    /lib/modules, built for other kernels, is hidden. The kernel asks /sbin/modprobe,
    or the payload's busybox where the image has none."""
    os.makedirs("/lib/modules", exist_ok=True)
    guestos.bind_mount(paths.payload_path("kernels", kernel, "lib", "modules"), "/lib/modules",
                       readonly=True)
    if not os.path.exists("/sbin/modprobe"):
        guestos.write_sysctls({"kernel.modprobe": paths.payload_path("bin", "modprobe")})


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
    """Start the workload, then serve the control channel (signals, resizes, execs)
    until it exits; returns its exit status."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.set_wakeup_fd(wake_w)
    _signal.signal(_signal.SIGCHLD, lambda *a: None)
    console, stdio = None, None
    if plan.terminal:
        console = os.open(CONSOLE, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        if plan.winsize:
            terminal.set_size(console, *plan.winsize)
    else:
        stdio = open_stdio_ports(ports)
    pid = spawn(plan, stdio)
    if stdio:
        for fd in stdio:
            os.close(fd)
    # The container side holds stdin and execs back until now: this guest kernel
    # drops what arrives on a port nobody has open.
    send = lambda data: write_all(control, data)  # noqa: E731
    send(wire.encode(wire.HELLO))
    network_changes = net_guest.PendingChanges()
    decoder = wire.Decoder()
    sessions = {}
    forwarder = None
    if plan.interfaces and dns.uses_embedded_dns():
        forwarder = dns.GuestForwarder(plan.dns_upstream)
    while True:
        statuses = reap()
        if pid in statuses:
            return statuses[pid]
        for session in list(sessions.values()):
            if session.pid in statuses:
                session.on_exit(statuses[session.pid])
            if session.ended:
                del sessions[session.channel]
        readers = {fd: s for s in sessions.values() for fd in s.readable_fds()}
        writers = {fd: s for s in sessions.values() for fd in s.writable_fds()}
        dns_socks = forwarder.sockets() if forwarder else []
        ready_r, ready_w, _ = select.select([control, wake_r, *dns_socks, *readers],
                                            list(writers), [],
                                            network_changes.timeout(
                                                forwarder.timeout(1.0) if forwarder else 1.0))
        if forwarder:
            for query in forwarder.serve(ready_r):
                send(wire.encode(wire.DNS, query))
        if wake_r in ready_r:
            os.read(wake_r, 4096)
        for fd in ready_w:
            writers[fd].write_stdin()
        for fd in ready_r:
            if fd in readers and fd in readers[fd].outputs:
                readers[fd].read_output(fd)
        if control in ready_r:
            data = os.read(control, 65536)
            if not data:        # a port whose host side is gone reads as EOF forever
                raise RuntimeError("the container side closed the control channel")
            for frame in wire.feed_tolerant(decoder, data, log):
                if frame.channel:
                    on_exec_frame(frame, sessions, pid, send)
                elif frame.type == wire.SIGNAL:
                    try:
                        os.kill(pid, frame.json()["signal"])
                    except ProcessLookupError:
                        pass
                elif frame.type == wire.DNS and forwarder:
                    forwarder.give_answer(frame.payload)
                elif frame.type == wire.NET:
                    network_changes.add(frame.json())
                elif frame.type == wire.RESIZE and console is not None:
                    size = frame.json()
                    terminal.set_size(console, size["rows"], size["cols"])
        for error in network_changes.apply_ready():
            log(f"network change failed: {error}")
            send(wire.encode(wire.ERROR, {"message": f"network change in the guest failed: "
                                                     f"{error}"}))


def on_exec_frame(frame, sessions, workload_pid, send):
    if frame.type == wire.EXEC_START:
        try:
            sessions[frame.channel] = ExecSession(frame.channel, frame.json(), workload_pid, send)
        except Exception as err:
            log(f"exec failed: {err!r}")
            send(wire.encode(wire.STDERR, f"dkvm: exec failed in the guest: {err}\n".encode(),
                             frame.channel))
            send(wire.encode(wire.EXEC_EXIT, {"status": 126}, frame.channel))
    elif frame.channel in sessions:
        sessions[frame.channel].on_frame(frame)


def write_all(fd, data):
    """A virtio-serial port takes at most 32 KiB a write."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def reap():
    """Reap every exited child (PID 1 adopts orphans): {pid: exit status}."""
    statuses = {}
    while True:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return statuses
        if pid == 0:
            return statuses
        code = os.waitstatus_to_exitcode(wstatus)
        statuses[pid] = 128 - code if code < 0 else code


def open_stdio_ports(ports):
    return (os.open(ports[paths.PORT_STDIN], os.O_RDONLY | os.O_CLOEXEC),
            os.open(ports[paths.PORT_STDOUT], os.O_WRONLY | os.O_CLOEXEC),
            os.open(ports[paths.PORT_STDERR], os.O_WRONLY | os.O_CLOEXEC))


def spawn(plan, stdio):
    """Start the workload as PID 1 of its own PID namespace, as runc does: it sees
    itself as PID 1, gets PID 1's signal semantics, and reaps its own orphans."""
    env = workload_env(plan.env, plan.uid)
    guestos.unshare(guestos.CLONE_NEWPID)
    pid = os.fork()
    if pid:
        return pid
    try:
        guestos.unshare(guestos.CLONE_NEWNS)
        guestos.make_mounts_private()
        guestos.mount("proc", "/proc", "proc", *guestos.mount_options(["nosuid", "nodev", "noexec"]))
        os.setsid()
        if plan.terminal:
            tty = os.open(CONSOLE, os.O_RDWR)
            fcntl.ioctl(tty, guestos.TIOCSCTTY, 0)
            stdio = (tty, tty, tty)
    except BaseException as err:
        os.write(2, f"dkvm: cannot set up the workload: {err}\n".encode())
        os._exit(127)
    become_and_exec(stdio, plan.args, env, plan.cwd, plan.uid, plan.gid, plan.additional_gids)


def finish(control, status):
    """End every process (as the end of PID 1 does in a container), report the status,
    wait for the container side to take it, and power off."""
    try:
        os.kill(-1, _signal.SIGKILL)
    except OSError:
        pass
    reap()
    os.sync()
    if control is not None:
        write_all(control, wire.encode(wire.EXIT, {"status": status}))
        wait_for_ack(control)
    guestos.power_off()


def wait_for_ack(control):
    decoder = wire.Decoder()
    deadline = time.monotonic() + ACK_WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([control], [], [], max(0, deadline - time.monotonic()))
        if not ready:
            continue
        data = os.read(control, 65536)      # EOF: the container side is gone, stop waiting
        if not data or any(f.type == wire.EXIT_ACK
                           for f in wire.feed_tolerant(decoder, data, log)):
            return
