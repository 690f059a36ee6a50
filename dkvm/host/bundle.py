"""The runtime's edits to the bundle the engine hands runc: config.json at `create`,
the process file at `exec`, and the container's own root (a skeleton of mount
points) beside them. The I/O around the pure rewrites of host.rewrite."""
import os

from dkvm import handoff, lightjson, paths
from dkvm.errors import DkvmError

# the container's root: a mount point for each of its mounts (paths.SKELETON), a pod's
# directory's too (host.pods)
SKELETON_DIRS = ("proc", "dev", "sys", "run", "tmp", "etc", paths.PAYLOAD_MOUNT[1:],
                 paths.SHARED_ROOTFS[1:], paths.SHARED_PAYLOAD[1:], paths.POD_DIR[1:])


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
    text). Every container gets a VM, or for a Kubernetes pod's member, its pod's
    (host.pods)."""
    from dkvm.host import pods
    from dkvm.host.facts import gather_host_facts
    from dkvm.host.rewrite import rewrite_create_config, rewrite_member_config
    bundle = call.bundle
    config_path = os.path.join(bundle, "config.json")
    with open(config_path) as f:
        original = f.read()
    config = lightjson.loads(original)
    pod, sandbox_id = pods.pod_role(config, bundle, call.container_id)
    layout = BundleLayout(bundle, config)
    facts = gather_host_facts(call.operator)
    if pod == pods.POD_MEMBER:
        new, plan = rewrite_member_config(config, facts, layout, call.container_id)
        new = pods.with_pod_dir(new, pods.find_pod_dir(sandbox_id))
    else:
        from dkvm.host.templates import template_for_create
        if pod == pods.POD_SANDBOX:             # the pod's VM: sized by the pod's limits
            from dkvm.host.pod_limits import read_pod_limits, with_pod_limits
            config = with_pod_limits(config, read_pod_limits(
                (config.get("linux") or {}).get("cgroupsPath")))
        new, plan = rewrite_create_config(config, facts, layout, call.container_id)
        plan.template = template_for_create(plan, new, facts.payload_dir)
        if pod == pods.POD_SANDBOX:
            new = pods.with_pod_dir(new, pods.make_pod_dir(sandbox_id), writable=True)
            plan.pod = pod
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


# where the guest mounts a container's kernel filesystems in its root (the rest of
# runc's, /dev/pts, /sys/fs/cgroup, ..., are inside these): runc makes these mount
# points in an image that lacks them (a pause image has nothing but its program)
KERNEL_MOUNT_POINTS = ("/proc", "/sys", "/dev")


def make_mount_points(layout, config, plan):
    """`--read-only`: the image is mounted read-only in the container, where runc
    cannot make the mount points of the mounts inside it, nor the guest those of the
    kernel's filesystems, its `--tmpfs`, disks and modules: make them first, as runc
    would have."""
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
    in_guest = [*KERNEL_MOUNT_POINTS, *(tmpfs.destination for tmpfs in plan.tmpfs),
                *(disk.mount_point for disk in plan.disks)]
    if plan.options.kernel_lib_modules:
        in_guest.append("/lib/modules")
    for path in in_guest:
        make_mount_point(layout.image_root, binds, layout.resolve(path, binds))


def prepare_exec(call):
    """`runc exec --process FILE` (`call`, a runc_cli.RuncCall): the process becomes the
    exec relay (dkvm-exec-relay), which gets its request as one more descriptor (handoff). Returns
    runc's exec arguments (after the subcommand). Into a pod's member (host.pods), the
    relay asks the pod's sandbox."""
    from dkvm.host.engines import DOCKER
    from dkvm.host.pods import is_member_exec
    from dkvm.host.rewrite import rewrite_exec_process
    path = call.process_file
    if not path:
        raise DkvmError("exec without --process FILE is not supported by dkvm")
    with open(path) as f:
        process = lightjson.loads(f.read())
    exec_args, request_fd = handoff.request_descriptor(call.command_args)
    relay, request = rewrite_exec_process(process, call.container_id,
                                          DOCKER.default_capabilities, request_fd,
                                          member=is_member_exec(call.container_id, call.log))
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
