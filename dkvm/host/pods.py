"""A Kubernetes pod is one VM (issue 26). containerd's CRI creates a pod's sandbox (its
pause container) and then each of its app containers through the runtime: the sandbox
becomes the pod's VM, each app container a member whose process runs in that VM. Here:
which of the two a `create` is, proven by what no image can choose, and the pod's
directory on the host (paths.HOST_PODS_DIR/<sandbox id>), where the sandbox's
container side listens for its members: made at the sandbox's create, found at each
member's, removed once runc has deleted the sandbox.

Imported on every `runc delete` (has_pod_dir): beyond paths and errors, nothing is
imported until a pod needs it."""
import os

from dkvm import paths
from dkvm.errors import DkvmError

# schema.POD_SANDBOX and POD_MEMBER (a unit test holds them equal): not imported, as
# every `runc delete` imports this module
POD_SANDBOX, POD_MEMBER = "sandbox", "member"

# What containerd's CRI annotates its containers with: each one's type (the sandbox, or
# an app container) and the id of the pod's sandbox, which is the sandbox's own
# container id.
CRI_CONTAINER_TYPE, CRI_SANDBOX_ID = ("io.kubernetes.cri.container-type",
                                      "io.kubernetes.cri.sandbox-id")
CRI_TYPES = {"sandbox": POD_SANDBOX, "container": POD_MEMBER}
# Where containerd's shim v2 keeps a task's bundle: <state dir>/TASK_DIR/<namespace>/<id>
# (/run/containerd by default, /run/k3s/containerd under k3s); CRI's namespace is k8s.io.
# Docker's are in the moby namespace, Podman's and CRI-O's under containers/storage.
CONTAINERD_TASK_DIR, CRI_NAMESPACE = "io.containerd.runtime.v2.task", "k8s.io"
# containerd's sandbox ids are 64 hex digits; a pod's directory is named by one, so
# nothing that could leave HOST_PODS_DIR or name it (a slash, a dot) is ever a name there
POD_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz"
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
MOST_POD_ID = 128
# containerd's shim gives runc its log in the bundle: `--log <bundle>/log.json`
RUNC_LOG = "log.json"


def pod_role(config, bundle, container_id):
    """(schema.POD_SANDBOX or POD_MEMBER, the pod's sandbox id) for a container of a
    pod containerd's CRI runs, ("", "") for any other (a VM of its own). A member's
    process goes into another container's VM, so being one must be proven by what an
    image cannot choose: engines copy an image's annotations into the config (Podman
    does), and an image claiming a pod's sandbox id would run in that pod's VM."""
    annotations = config.get("annotations") or {}
    role = CRI_TYPES.get(annotations.get(CRI_CONTAINER_TYPE))
    sandbox_id = annotations.get(CRI_SANDBOX_ID)
    if not role or not container_id or not isinstance(sandbox_id, str):
        return "", ""                   # not CRI's
    if not in_cri_task_dir(bundle, container_id):
        return "", ""                   # annotations alone prove nothing
    if (role == POD_SANDBOX) != (sandbox_id == container_id):
        return "", ""                   # CRI's sandbox is the one its sandbox id names
    return role, checked_pod_id(sandbox_id)


def in_cri_task_dir(bundle, container_id):
    """Whether `bundle` (by its real path) is where containerd's shim keeps CRI's task
    `container_id`: no other engine puts a bundle there."""
    parts = os.path.realpath(bundle).split(os.sep)
    return parts[-3:] == [CONTAINERD_TASK_DIR, CRI_NAMESPACE, container_id]


def checked_pod_id(sandbox_id):
    if not is_pod_id(sandbox_id):
        raise DkvmError(f"the pod's sandbox id {sandbox_id[:MOST_POD_ID]!r} is not one "
                        f"DKVM names a pod's directory by (at most {MOST_POD_ID} letters, "
                        "digits, - and _)")
    return sandbox_id


def is_pod_id(text):
    return 0 < len(text) <= MOST_POD_ID and set(text) <= POD_ID_CHARS


def pod_dir(sandbox_id):
    return os.path.join(paths.HOST_PODS_DIR, sandbox_id)


def pod_mount(source, writable):
    """The pod's directory in a sandbox's or member's container, after DKVM's own
    mounts: nothing the engine mounts covers it. Only the sandbox's side writes there
    (its socket): a member's could otherwise put a socket of its own in its place."""
    return {"destination": paths.POD_DIR, "type": "bind", "source": source,
            "options": ["bind", "rprivate", "nosuid", "nodev", "noexec",
                        "rw" if writable else "ro"]}


def with_pod_dir(config, source, writable=False):
    """`config` (a rewritten one) with the pod's directory mounted at paths.POD_DIR."""
    return {**config, "mounts": list(config.get("mounts") or []) + [pod_mount(source,
                                                                              writable)]}


# --- the pod's directory --------------------------------------------------------------

def make_pod_dir(sandbox_id):
    """At the sandbox's create: its pod's directory, made fresh (root's, 0700). One
    left by an earlier create of the same id (runc failed, the delete never came) is
    removed first; anything there that is not root's plain directory is refused."""
    pods = open_pods_dir(create=True)
    try:
        name = checked_pod_id(sandbox_id)
        if entry_stat(pods, name) is not None:
            check_pod_dir(pods, name)
            remove_tree(pods, name)
        os.mkdir(name, 0o700, dir_fd=pods)
        check_pod_dir(pods, name)
    except OSError as err:
        raise DkvmError(f"the directory of pod {sandbox_id} cannot be made in "
                        f"{paths.HOST_PODS_DIR}: {err.strerror}") from None
    finally:
        os.close(pods)
    return pod_dir(sandbox_id)


def find_pod_dir(sandbox_id):
    """At a member's create: its pod's directory, which the sandbox's create made."""
    try:
        pods = open_pods_dir(create=False)
    except FileNotFoundError:
        raise no_pod(sandbox_id) from None
    try:
        check_pod_dir(pods, checked_pod_id(sandbox_id))
    finally:
        os.close(pods)
    return pod_dir(sandbox_id)


def has_pod_dir(container_id, runc_log):
    """Whether `container_id` names a pod's directory and the delete is CRI's (runc's
    log, in the bundle containerd's shim names, is in CRI's task state: another
    engine's container of the same id is not the pod's): it is a sandbox DKVM made one
    for (at `runc delete`: one lstat for any container)."""
    return bool(container_id) and is_pod_id(container_id) and bool(runc_log) and \
        os.path.basename(runc_log) == RUNC_LOG and \
        in_cri_task_dir(os.path.dirname(runc_log), container_id) and \
        os.path.lexists(pod_dir(container_id))


def remove_pod_dir(sandbox_id):
    """After runc's delete of the sandbox: its pod's directory and all in it (the
    members' socket, and whatever the container side made there), no link followed."""
    try:
        pods = open_pods_dir(create=False)
    except FileNotFoundError:
        return
    try:
        remove_tree(pods, checked_pod_id(sandbox_id))
    except OSError as err:
        raise DkvmError(f"the directory of pod {sandbox_id} ({pod_dir(sandbox_id)}) cannot "
                        f"be removed: {err.strerror} ({err.filename})") from None
    finally:
        os.close(pods)


def open_pods_dir(create):
    """HOST_PODS_DIR, open, for the pods' directories to be made, checked and removed
    through it: a directory of root's that no one else can write, not a link."""
    try:
        if create:
            os.makedirs(paths.HOST_PODS_DIR, mode=0o700, exist_ok=True)
        fd = os.open(paths.HOST_PODS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                     | os.O_CLOEXEC)
    except OSError as err:
        if isinstance(err, FileNotFoundError) and not create:
            raise
        raise DkvmError(f"{paths.HOST_PODS_DIR}, where DKVM keeps pods, cannot be opened as "
                        f"a directory: {err.strerror}") from None
    info = os.fstat(fd)
    if info.st_uid != 0 or info.st_mode & 0o022:
        os.close(fd)
        raise DkvmError(f"{paths.HOST_PODS_DIR} is not root's alone: DKVM keeps pods "
                        "there; remove it")
    return fd


def entry_stat(dir_fd, name):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def check_pod_dir(pods, name):
    import stat
    info = entry_stat(pods, name)
    if info is None:
        raise no_pod(name)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
        raise DkvmError(f"the directory of pod {name} ({pod_dir(name)}) is not a directory "
                        "of root's: DKVM will not use it")


def no_pod(sandbox_id):
    return DkvmError(f"pod {sandbox_id} has no DKVM sandbox ({pod_dir(sandbox_id)} is "
                     "missing): its sandbox must run with the same runtime class")


def remove_tree(parent, name):
    """Entry `name` of directory `parent` and, for a directory, all under it: no link
    followed (a link is removed itself), no other filesystem entered (a mount point
    there fails the removal), iteratively (a container side could nest directories
    deeper than Python recurses)."""
    import stat
    top = entry_stat(parent, name)
    if top is None:
        return
    if not stat.S_ISDIR(top.st_mode):
        os.unlink(name, dir_fd=parent)
        return
    opened, names = [], []          # the directories being emptied, from the top down
    try:
        opened.append(open_same_dir(parent, name, top.st_dev))
        names.append(name)
        while opened:
            child = next_child(opened[-1])
            if child is not None:
                opened.append(open_same_dir(opened[-1], child, top.st_dev))
                names.append(child)
                continue
            os.close(opened.pop())
            os.rmdir(names.pop(), dir_fd=opened[-1] if opened else parent)
    finally:
        for fd in opened:
            os.close(fd)


def open_same_dir(parent_fd, name, device):
    """Directory `name` in `parent_fd`, opened without following a link; OSError for
    one that is now something else, or on another filesystem."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=parent_fd)
    if os.fstat(fd).st_dev != device:
        os.close(fd)
        raise OSError(16, "a mount point in a pod's directory", name)
    return fd


def next_child(fd):
    """Removes the non-directories in directory `fd` and returns the name of one
    directory left in it (None once it is empty)."""
    import stat
    for name in os.listdir(fd):
        info = entry_stat(fd, name)
        if info is None:
            continue
        if stat.S_ISDIR(info.st_mode):
            return name
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:       # gone meanwhile (another delete's removal)
            pass
    return None


# --- exec ----------------------------------------------------------------------------

def is_member_exec(container_id, runc_log):
    """Whether `runc exec` (with runc's log at `runc_log`) is into a pod's member. Only
    a container whose bundle is CRI's can be one (pod_role's proof), and containerd's
    shim names runc's log in the bundle; the member's plan, root's file the runtime
    wrote in its root at create, says what it is. Cheaper than `runc state` (a process
    on every exec) or the engine's config.json (all of it read): no process, and one
    small file read only for CRI's containers."""
    if not container_id or not runc_log or os.path.basename(runc_log) != RUNC_LOG:
        return False
    bundle = os.path.dirname(runc_log)
    if not in_cri_task_dir(bundle, container_id):
        return False
    from dkvm import handoff, lightjson
    try:
        plan = lightjson.loads(handoff.read_plan(os.path.join(os.path.realpath(bundle),
                                                              paths.SKELETON)))
    except (OSError, ValueError):
        return False
    return isinstance(plan, dict) and plan.get("pod") == POD_MEMBER
