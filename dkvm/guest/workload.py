"""The workload in the guest: PID 1 of its own PID and mount namespaces, as runc
starts it, in the image's root, with the container's stdio ports or the console as
its terminal."""
import fcntl
import os
import select

from dkvm import paths
from dkvm.guest import syscalls, world
from dkvm.guest.process import become_and_exec

SETUP_FAILED = 125          # the VM could not give the workload its container
SETUP_WAIT = 60             # the workload's namespaces and mounts being made
GO = b"g"


def open_console(winsize):
    """The guest console (QEMU's stdio, with -t), at the client's terminal size."""
    from dkvm import terminal
    console = os.open(world.CONSOLE, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    if len(winsize) == 2:
        terminal.set_size(console, *winsize)
    return console


def spawn(plan, stdio, disks=None):
    """Start the workload as PID 1 of its own PID namespace, as runc does: it sees
    itself as PID 1, gets PID 1's signal semantics, and reaps its own orphans. It has
    its own cgroup (world.make_workload_cgroup) and cgroup namespace. Its mount
    namespace has the image's root as its root (pivot_root: nothing of init's
    stays reachable) with a container's filesystems mounted in it. With a terminal,
    the console is its controlling terminal and stdio; `disks`: DKVM_DISKS' device
    nodes by serial (world.attach_disks), mounted in its root. (After this, init may not
    start threads or other processes: the kernel refuses threads once it has unshared
    its PID namespace, and a child would be the workload's.)
    The child builds its world at once, while init names the VM and brings its network
    up (each on a vCPU of its own), then waits: as under runc, the workload runs only
    once the container's network is up (StartingWorkload.start)."""
    syscalls.unshare(syscalls.CLONE_NEWPID)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    user_ns = UserNamespaceHandshake(plan) if plan.uid_mappings else None
    pid = os.fork()
    if pid:
        os.close(ready_w)
        os.close(go_r)
        return StartingWorkload(pid, ready_r, go_w, user_ns)
    os.close(ready_r)
    os.close(go_w)
    if plan.process.terminal:
        try:
            tty = os.open(world.CONSOLE, os.O_RDWR)
        except OSError as err:
            report_setup_failure(2, err)
        stdio = (tty, tty, tty)
    enter_container(plan, paths.SHARED_ROOTFS, stdio, disks, console=plan.process.terminal)
    if os.read(go_r, 1) != GO:          # init failed meanwhile: it reports why
        os._exit(SETUP_FAILED)
    plan.process.rlimits = plan.default_rlimits + plan.process.rlimits
    become_and_exec(stdio, plan.process, enter_user_namespace=user_ns and user_ns.enter)


def enter_container(plan, root, stdio, disks=None, console=False, cgroup=None, devpts=None,
                    volumes=()):
    """In a forked child: the container's world from `plan`, rooted at `root` (the
    workload's, or a pod member's export, with a `cgroup` of its own, the `devpts` its
    terminal is on and its pod's `volumes`, [(mount, destination)], bound over their
    places in its export): its cgroup and cgroup and mount namespaces,
    runc's mounts, masks and root flags, a session of its own with its terminal
    (stdio[0]) as the controlling one; `console`: the VM's console is that terminal,
    bound at /dev/console as runc binds its own. A failure is told on its stderr and
    ends the child."""
    try:
        world.join_cgroup(cgroup or world.WORKLOAD_CGROUP)
        syscalls.unshare(syscalls.CLONE_NEWCGROUP | syscalls.CLONE_NEWNS)
        syscalls.make_mounts_private()
        world.mount_workload_modules(plan, root)
        world.mount_disks(plan, disks or {}, root)
        for source, destination in volumes:
            syscalls.mount(source, os.path.join(root, destination.lstrip("/")), "",
                           syscalls.MS_BIND | syscalls.MS_REC)
        devpts = devpts and syscalls.clone_mount(devpts)    # out of reach once pivoted
        syscalls.pivot_to(root)
        world.mount_container_filesystems(plan, console=console, devpts=devpts)
        syscalls.mount("proc", "/proc", "proc",
                       *syscalls.mount_options(["nosuid", "nodev", "noexec"]))
        world.mask_and_protect_paths(plan)
        if plan.root_propagation:
            syscalls.set_root_propagation(plan.root_propagation)
        if plan.readonly_root:          # as runc shows it (the container side enforces it)
            syscalls.mount("", "/", "", syscalls.MS_REMOUNT | syscalls.MS_BIND
                           | syscalls.MS_RDONLY)
        os.setsid()
        if plan.process.terminal:
            fcntl.ioctl(stdio[0], syscalls.TIOCSCTTY, 0)
    except BaseException as err:
        report_setup_failure(stdio[2] if stdio else 2, err)


def report_setup_failure(fd, err):
    try:
        os.write(fd, f"dkvm: cannot set up the container in the VM: {err}\n".encode())
    finally:
        os._exit(SETUP_FAILED)


class StartingWorkload:
    """The workload's child, its world built or being built, waiting to exec."""

    def __init__(self, pid, ready_r, go_w, user_ns):
        self.pid, self.ready_r, self.go_w, self.user_ns = pid, ready_r, go_w, user_ns

    def start(self):
        """Returns the workload's pid once it has exec'd (or failed: its exit status
        tells): an exec joins its namespaces, which must hold its world by then."""
        try:
            os.write(self.go_w, GO)
        except BrokenPipeError:         # its setup failed: it said so and exited
            pass
        finally:
            os.close(self.go_w)
        if self.user_ns:
            self.user_ns.write_mappings(self.pid, self.ready_r)
        wait_for_exec(self.ready_r)
        return self.pid


class UserNamespaceHandshake:
    """The workload's user namespace (linux.uidMappings, gidMappings): the child
    unshares it last, once its mounts and limits are made as the VM's root; init (in
    the VM's own namespace, where it may) writes the maps; then the child goes on."""
    def __init__(self, plan):
        self.plan = plan
        self.asked_r, self.asked_w = os.pipe2(os.O_CLOEXEC)
        self.done_r, self.done_w = os.pipe2(os.O_CLOEXEC)

    def enter(self):                    # in the child
        os.close(self.asked_r)          # init's ends: with them closed here, init's exit
        os.close(self.done_w)           # (or its giving up) reads as EOF, not a wait
        syscalls.unshare(syscalls.CLONE_NEWUSER)
        os.write(self.asked_w, b"u")
        if os.read(self.done_r, 1) != b"k":
            raise OSError("init did not write the user namespace's mappings")

    def write_mappings(self, pid, ready_r):    # in init
        os.close(self.asked_w)
        os.close(self.done_r)
        try:
            ready, _, _ = select.select([self.asked_r, ready_r], [], [], SETUP_WAIT)
            if self.asked_r in ready and os.read(self.asked_r, 1) == b"u":
                for name, maps in (("uid_map", self.plan.uid_mappings),
                                   ("gid_map", self.plan.gid_mappings)):
                    with open(f"/proc/{pid}/{name}", "w") as f:
                        f.write("".join(f"{m.container_id} {m.host_id} {m.size}\n"
                                        for m in maps))
                os.write(self.done_w, b"k")
        finally:
            os.close(self.asked_r)
            os.close(self.done_w)


def wait_for_exec(ready_r):
    """The child's end of the pipe closes at its exec (close-on-exec) or its exit."""
    try:
        select.select([ready_r], [], [], SETUP_WAIT)
    finally:
        os.close(ready_r)
