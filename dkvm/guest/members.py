"""A Kubernetes pod's members in the pod's VM (host.pods): each app container of the
pod runs here, in its own root (its container side's export, hot-plugged with its
own tag), its own PID, mount and cgroup namespaces, and the VM's network, UTS and IPC
namespaces, which are the pod's.

Init's children land in the PID namespace its `pid_for_children` names: the
workload's (the sandbox's pause), for every exec into it. A member's PID 1 is forked
into a new namespace of its own, an exec into a member into that member's; each fork
sets it back to the workload's."""
import os

from dkvm import paths
from dkvm.guest import syscalls, world
from dkvm.guest.process import become_and_exec
from dkvm.guest.workload import enter_container


def export_root(tag):
    """The member's export mounted at MEMBERS_DIR/<tag>; its root filesystem's path."""
    target = os.path.join(paths.MEMBERS_DIR, tag)
    os.makedirs(target, exist_ok=True)
    world.mount_export(tag, target)
    return target + paths.SHARED_ROOTFS[len(paths.SHARE_DIR):]


def remove_export(tag):
    """The member is gone (its PID 1 took every process of its namespace along)."""
    target = os.path.join(paths.MEMBERS_DIR, tag)
    try:
        syscalls.unmount(target, syscalls.MNT_DETACH)
        os.rmdir(target)
    except OSError:
        pass


def spawn_member(plan, root, stdio, workload_pid):
    """The member's PID 1, forked into a new PID namespace and building its container
    from `plan` at `root` before it execs its process; its pid."""
    active = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    pid = None
    try:
        syscalls.setns(active, syscalls.CLONE_NEWPID)
        syscalls.unshare(syscalls.CLONE_NEWPID)
        pid = os.fork()
    finally:
        if pid != 0:                    # init, whether or not the fork was made
            os.close(active)
            back_to_workload(workload_pid)
    if pid:
        return pid
    enter_container(plan, root, stdio)
    become_and_exec(stdio, plan.process)


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
