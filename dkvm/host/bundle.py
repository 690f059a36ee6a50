"""The runtime's edits to the bundle the engine hands runc: config.json at `create`,
the process file at `exec`, and the container's own root (a skeleton of mount
points) beside them. The I/O around the pure rewrites of host.rewrite."""
import os

from dkvm import handoff, lightjson, paths
from dkvm.errors import DkvmError

# What containerd's CRI annotates a pod's sandbox (pause) container with: its type,
# and the sandbox's id, which for the sandbox itself is its own container id.
CRI_CONTAINER_TYPE, CRI_SANDBOX_ID = ("io.kubernetes.cri.container-type",
                                      "io.kubernetes.cri.sandbox-id")
# Where containerd's shim v2 keeps a task's bundle: <state dir>/TASK_DIR/<namespace>/<id>
# (/run/containerd by default, /run/k3s/containerd under k3s); CRI's namespace is k8s.io.
# Docker's are in the moby namespace, Podman's and CRI-O's under containers/storage.
CONTAINERD_TASK_DIR, CRI_NAMESPACE = "io.containerd.runtime.v2.task", "k8s.io"
# the container's root: a mount point for each of its mounts (paths.SKELETON)
SKELETON_DIRS = ("proc", "dev", "sys", "run", "tmp", "etc", paths.PAYLOAD_MOUNT[1:],
                 paths.SHARED_ROOTFS[1:], paths.SHARED_PAYLOAD[1:])


class BundleLayout:
    """Where one container's root is (made here, in its bundle: the engine removes it
    with the bundle) and where its image's root is."""

    def __init__(self, bundle, config):
        # runc wants the root's real path (engines name bundles under /var/run: a link)
        self.skeleton = os.path.join(os.path.realpath(bundle), paths.SKELETON)
        root = (config.get("root") or {}).get("path") or "rootfs"
        self.image_root = os.path.normpath(os.path.join(os.path.abspath(bundle), root))

    def resolve(self, destination, binds):
        from dkvm.host.image_paths import real_destination
        return real_destination(self.image_root, destination, binds)

    def image_kernel(self, release):
        """DKVM_KERNEL=image: (path, release) of the image's kernel, which has its
        modules in the image; DkvmError if there is none."""
        from dkvm.boot.image_kernel import find_kernel, modules_dir
        path, release = find_kernel(self.image_root, release)
        modules_dir(self.image_root, release)
        return path, release

    def make_skeleton(self):
        for name in SKELETON_DIRS:
            os.makedirs(os.path.join(self.skeleton, name), mode=0o755, exist_ok=True)


def prepare_create(call):
    """Rewrite the bundle's config.json for `runc create` (`call`, a runc_cli.RuncCall);
    what to put back once runc has read it (restore_config): (path, the engine's
    text), or None for a config runc runs as it is."""
    from dkvm.host.facts import gather_host_facts
    from dkvm.host.rewrite import rewrite_create_config
    from dkvm.host.templates import template_for_create
    bundle = call.bundle
    config_path = os.path.join(bundle, "config.json")
    with open(config_path) as f:
        original = f.read()
    config = lightjson.loads(original)
    if is_pod_sandbox(config, bundle, call.container_id):
        return None
    layout = BundleLayout(bundle, config)
    facts = gather_host_facts(call.operator)
    new, plan = rewrite_create_config(config, facts, layout, call.container_id)
    plan.template = template_for_create(plan, new, facts.payload_dir)
    layout.make_skeleton()
    handoff.write_plan(layout.skeleton, plan.to_json())
    if (config.get("root") or {}).get("readonly"):
        make_mount_points(layout, new, plan)
    replace_json(config_path, new)
    return config_path, original


def restore_config(config_path, original):
    """The engine's config.json again: runc keeps what it created from, and the engine
    (Podman's exec), tools and a second create read the bundle as it was written."""
    replace_file_text(config_path, original)


def is_pod_sandbox(config, bundle, container_id):
    """A Kubernetes pod's sandbox (its pause container) that containerd's CRI runs with
    the pod's runtime class too: it only holds the pod's namespaces, and runc runs it
    as it is (the pod's DKVM container then takes the network namespace's interfaces).
    The only container without a VM, so it must be proven to be CRI's by what an
    image cannot choose: engines copy an image's annotations into the config (Podman
    does), so the annotations alone prove nothing. CRI's sandbox is the container its
    sandbox-id names, and its bundle is in containerd's task state for the k8s.io
    namespace, where no other engine puts one. CRI-O's sandbox gets a VM."""
    annotations = config.get("annotations") or {}
    if annotations.get(CRI_CONTAINER_TYPE) != "sandbox" or not container_id or \
            annotations.get(CRI_SANDBOX_ID) != container_id:
        return False
    parts = os.path.realpath(bundle).split(os.sep)
    return parts[-3:] == [CONTAINERD_TASK_DIR, CRI_NAMESPACE, container_id]


def make_mount_points(layout, config, plan):
    """`--read-only`: the image is mounted read-only in the container, where runc
    cannot make the mount points of the mounts inside it, nor the guest those of its
    `--tmpfs`, disks and modules: make them first, as runc would have."""
    from dkvm.host.image_paths import make_mount_point
    binds = []
    for mount in config["mounts"]:
        if not mount["destination"].startswith(paths.SHARED_ROOTFS + "/"):
            continue
        path = mount["destination"][len(paths.SHARED_ROOTFS):]
        source = mount.get("source", "")
        make_mount_point(layout.image_root, binds, path,
                         directory=mount.get("type") != "bind" or os.path.isdir(source))
        if mount.get("type") == "bind":
            binds.append((path, source))
    in_guest = [tmpfs.destination for tmpfs in plan.tmpfs] + [disk.mount_point
                                                              for disk in plan.disks]
    if plan.options.kernel_lib_modules:
        in_guest.append("/lib/modules")
    for path in in_guest:
        make_mount_point(layout.image_root, binds, layout.resolve(path, binds))


def prepare_exec(call):
    """`runc exec --process FILE` (`call`, a runc_cli.RuncCall): the process becomes the
    exec relay (dkvm-exec-relay), which gets its request as one more descriptor (handoff). Returns
    runc's exec arguments (after the subcommand)."""
    from dkvm.host.engines import DOCKER
    from dkvm.host.rewrite import rewrite_exec_process
    path = call.process_file
    if not path:
        raise DkvmError("exec without --process FILE is not supported by dkvm")
    with open(path) as f:
        process = lightjson.loads(f.read())
    exec_args, request_fd = handoff.request_descriptor(call.command_args)
    relay, request = rewrite_exec_process(process, call.container_id,
                                          DOCKER.default_capabilities, request_fd)
    handoff.pass_request(request_fd, request.to_json())
    replace_json(path, relay)
    return exec_args


def replace_json(path, data):
    replace_file_text(path, lightjson.dumps(data))


def replace_file_text(path, text):
    tmp = path + ".dkvm-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
