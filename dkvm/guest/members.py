"""A Kubernetes pod's members in the pod's VM (host.pods): each app container of the
pod runs here, in its own root (its container side's export, hot-plugged with its
own tag), its own PID namespace (or the pause's, when the pod shares one:
shareProcessNamespace), its own cgroup, mount and cgroup namespaces, and the VM's
network, UTS and IPC namespaces, which are the pod's.

Init's children land in the PID namespace its `pid_for_children` names: the
workload's (the sandbox's pause), for every exec into it. A member's PID 1 is forked
into a new namespace of its own, an exec into a member into that member's; each fork
sets it back to the workload's. A member's processes are its cgroup's: when its
first process ends, the rest are killed, as the runtime's shim kills them under runc
when the namespace is shared (else the kernel does, with the namespace)."""
import os
import _signal

from dkvm import paths
from dkvm.guest import syscalls, world
from dkvm.guest.process import become_and_exec
from dkvm.guest.workload import enter_container

KILL_ROUNDS = 50        # a kernel without cgroup.kill: kill what cgroup.procs lists, again
volume_users = {}       # a pod volume's tag -> how many members use its mount


def export_root(tag):
    """The member's export mounted at MEMBERS_DIR/<tag>; its root filesystem's path."""
    target = os.path.join(paths.MEMBERS_DIR, tag)
    os.makedirs(target, exist_ok=True)
    world.mount_export(tag, target)
    return target + paths.SHARED_ROOTFS[len(paths.SHARE_DIR):]


def mount_volumes(volumes):
    """The member's volumes (schema.PodVolume: each one export for the pod), each
    mounted once at MEMBERS_DIR/<tag>, for as long as a member uses it; [(that mount,
    where it goes in the member's root)]."""
    mounted = []
    try:
        for volume in volumes:
            target = os.path.join(paths.MEMBERS_DIR, volume.tag)
            if not volume_users.get(volume.tag):
                os.makedirs(target, exist_ok=True)
                world.mount_export(volume.tag, target)
            volume_users[volume.tag] = volume_users.get(volume.tag, 0) + 1
            mounted.append(volume)
    except BaseException:
        release_volumes(mounted)
        raise
    return [(os.path.join(paths.MEMBERS_DIR, v.tag), v.destination) for v in volumes]


def release_volumes(volumes):
    """A member's volumes it no longer uses: one nobody uses is unmounted (the
    container side unplugs it once the member's end is reported)."""
    for volume in volumes:
        volume_users[volume.tag] = volume_users.get(volume.tag, 1) - 1
        if volume_users[volume.tag] <= 0:
            del volume_users[volume.tag]
            target = os.path.join(paths.MEMBERS_DIR, volume.tag)
            try:
                syscalls.unmount(target, syscalls.MNT_DETACH)
                os.rmdir(target)
            except OSError:
                pass


def member_devpts(tag):
    """A devpts instance of the member's own, made before it is (its terminal is made
    there, and it mounts the same instance at its /dev/pts); its ptmx."""
    target = os.path.join(paths.MEMBERS_DIR, f"{tag}.pts")
    os.makedirs(target, exist_ok=True)
    syscalls.mount("devpts", target, "devpts", *syscalls.mount_options(
        ["nosuid", "noexec", "newinstance", "gid=5", "mode=620", "ptmxmode=666"]))
    return os.path.join(target, "ptmx")


def remove_member(tag, volumes=()):
    """The member is gone, with every process of its cgroup (end_member): its export,
    its devpts and its cgroup go, and its hold on its volumes."""
    release_volumes(volumes)
    target = os.path.join(paths.MEMBERS_DIR, tag)
    devpts = target + ".pts"
    for remove in (lambda: syscalls.unmount(target, syscalls.MNT_DETACH),
                   lambda: os.rmdir(target),
                   lambda: syscalls.unmount(devpts, syscalls.MNT_DETACH),
                   lambda: os.rmdir(devpts), lambda: os.rmdir(member_cgroup(tag))):
        try:
            remove()
        except OSError:
            pass


def member_cgroup(tag):
    return f"{world.CGROUP_ROOT}/member-{tag}"


def spawn_member(plan, root, stdio, workload_pid, tag, volumes=()):
    """The member's PID 1, forked into a new PID namespace (or the workload's, shared)
    and into its own cgroup, building its container from `plan` at `root`, with its
    `volumes` (mount_volumes) bound in it, before it execs its process; its pid."""
    os.makedirs(member_cgroup(tag), exist_ok=True)
    active = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    pid = None
    try:
        if not plan.pod_shares_pid:
            syscalls.setns(active, syscalls.CLONE_NEWPID)
            syscalls.unshare(syscalls.CLONE_NEWPID)
        pid = os.fork()
    finally:
        if pid != 0:                    # init, whether or not the fork was made
            os.close(active)
            back_to_workload(workload_pid)
    if pid:
        return pid
    devpts = os.path.join(paths.MEMBERS_DIR, f"{tag}.pts") if plan.process.terminal else None
    enter_container(plan, root, stdio, cgroup=member_cgroup(tag), devpts=devpts,
                    volumes=volumes)
    become_and_exec(stdio, plan.process)


def end_member(tag):
    """The member's first process has ended: the rest of its processes go too."""
    path = member_cgroup(tag)
    try:
        with open(path + "/cgroup.kill", "w") as f:
            f.write("1")
        return
    except FileNotFoundError:
        pass                            # before Linux 5.14, or no such cgroup
    except OSError:
        return
    for _ in range(KILL_ROUNDS):
        try:
            with open(path + "/cgroup.procs") as f:
                pids = [int(line) for line in f if line.strip()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, _signal.SIGKILL)
            except OSError:
                pass


def fork_in(target_pid, workload_pid):
    """Fork into the PID namespace of `target_pid` (a member's PID 1); init's next
    children go to the workload's again."""
    target = os.open(f"/proc/{target_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    pid = None
    try:
        syscalls.setns(target, syscalls.CLONE_NEWPID)
        pid = os.fork()
    finally:
        if pid != 0:                    # init, whether or not the fork was made
            os.close(target)
            back_to_workload(workload_pid)
    return pid


def back_to_workload(workload_pid):
    namespace = os.open(f"/proc/{workload_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(namespace, syscalls.CLONE_NEWPID)
    finally:
        os.close(namespace)
