"""Where things live: on the host, in the container, and in the guest; and where the
plan and each exec's request reach the container side (handoff).

The container's root is DKVM's own (a skeleton of empty mount points, read-only): the
payload at PAYLOAD_MOUNT, private tmpfs at /run, /tmp and /etc, and SHARE_DIR, the one
directory virtiofsd exports, holding the image's root filesystem with Docker's mounts
(SHARED_ROOTFS) and the payload again for the guest (SHARED_PAYLOAD). Nothing the
container side runs or opens is inside the image; nothing it keeps (sockets, logs) is
inside the export. The guest's init mounts the export at SHARE_DIR in a root of its
own and sees the payload at PAYLOAD_MOUNT too; the workload's root is SHARED_ROOTFS.
So every in-container and in-guest path is fixed; only the host directory depends on
the build id.
"""
import os

HOST_STATE_DIR = "/var/lib/dkvm"
# The operator's policy: which options that weaken the boundary a container may set
# (host.policy). In /etc, the operator's, not in the state directory install replaces.
POLICY_FILE = "/etc/dkvm/policy.json"
PAYLOAD_MOUNT = "/.dkvm"
SHARE_DIR = "/share"                      # what virtiofsd serves
SHARED_ROOTFS = SHARE_DIR + "/rootfs"     # the image's root, the workload's root
SHARED_PAYLOAD = SHARE_DIR + "/dkvm"      # the payload, read-only, for the guest
RUN_DIR = "/run"                          # sockets and logs: private to the container side
SKELETON = "dkvm-root"                    # in the bundle: the container's root
CONTROL_SOCKET = RUN_DIR + "/control.sock"
VIRTIOFS_SOCKET = RUN_DIR + "/virtiofs.sock"
QEMU_LOG = RUN_DIR + "/qemu.log"
CONSOLE_LOG = RUN_DIR + "/console.log"    # the guest kernel's errors (serial console)
QMP_SOCKET = RUN_DIR + "/qmp.sock"
VIRTIOFSD_LOG = RUN_DIR + "/virtiofsd.log"
VIRTIOFS_TAG = "root"
PORT_CONTROL = "org.dkvm.control"
PORT_STDOUT = "org.dkvm.stdout"
PORT_STDERR = "org.dkvm.stderr"
PORT_STDIN = "org.dkvm.stdin"
STDIN_SOCKET = RUN_DIR + "/stdin.sock"
EXEC_SOCKET = RUN_DIR + "/exec.sock"      # exec relays (dkvm-exec-relay) connect here
SIGNAL_SOCKET = RUN_DIR + "/signal.sock"  # the runtime asks for SIGKILL/SIGSTOP here
IMAGE_INITRD = RUN_DIR + "/initrd.img"    # DKVM_KERNEL=image: made at start from its modules
GUEST_INIT_DIR = "guest-init"             # in the payload: the guest's first scripts
# In a payload kernel's lib/modules/<release>: depmod's modules.devname, renamed. For
# the guest's init (guest.world); under its own name a systemd without kmod would fail
# kmod-static-nodes.service (skipped where there is no modules.devname).
STATIC_NODES = "dkvm.static-nodes"
# A kernel with virtio and virtiofs built in mounts the export as its root and starts
# dkvm-vm-init from the payload there (DIRECT_PAYLOAD, the payload as seen from the
# export's top) with ENTER_OWN_ROOT: init first builds its own root in DIRECT_ROOT.
DIRECT_PAYLOAD = SHARED_PAYLOAD[len(SHARE_DIR):]
DIRECT_ROOT = DIRECT_PAYLOAD + "/" + GUEST_INIT_DIR + "/root"
ENTER_OWN_ROOT = "--enter-own-root"
# A template (host.templates) boots a payload kernel with the TEMPLATE_INITRD beside
# it, whose /init starts dkvm-vm-init with FROM_TEMPLATE: its root is the initramfs,
# the export comes with the plan. Templates live in the payload directory
# (TEMPLATES_DIR), so a container sees them read-only at PAYLOAD_MOUNT and they go
# with their build.
TEMPLATE_INITRD = "template.img"
FROM_TEMPLATE = "--from-template"
TEMPLATES_DIR = "templates"
# A Kubernetes pod is one VM (host.pods): its sandbox's container side runs it, and
# each other container of the pod is a member whose container side (dkvm-pod-member)
# exports its own root and has the pod's VM run its process. They meet in the pod's
# directory, made by the host at the sandbox's create (HOST_PODS_DIR/<sandbox id>) and
# mounted at POD_DIR in each: the sandbox's container side listens on POD_SOCKET.
HOST_PODS_DIR = "/run/dkvm/pods"
POD_DIR = "/pod"
POD_SOCKET = POD_DIR + "/members.sock"
MEMBERS_DIR = "/members"                  # in the guest: each member's export, by its tag
# A member's directory volumes (emptyDir, configMap, ...), each also bound here in its
# container side, by number, for its relay to hand to the sandbox: a volume two members
# share is one export, served once (host.rewrite.with_pod_volumes)
POD_VOLUMES_DIR = "/run/pod-volumes"
EMBEDDED_DNS = ("127.0.0.11", 53)         # Docker's DNS server in the container's namespace

PLAN_FILE = "plan.json"                   # in the container's root: the entrypoint's plan
EXEC_REQUEST_FD = "--request-fd"          # the exec relay's argument: its request's descriptor


def host_payload_dir(build_id):
    return os.path.join(HOST_STATE_DIR, build_id)


def payload_path(*parts, root=PAYLOAD_MOUNT):
    return os.path.join(root, *parts)


def payload_program_argv(program, root=PAYLOAD_MOUNT):
    """Run a payload ELF through the payload's own loader and libraries, so that it
    works in any image: musl, distroless, or no libc at all."""
    return [payload_path("lib", "ld-linux-x86-64.so.2", root=root),
            "--library-path", payload_path("lib", root=root), program]


def role_argv(role, root=PAYLOAD_MOUNT):
    """Start an in-container or in-guest role with the payload's Python."""
    python = payload_path("python", "bin", "python3", root=root)
    return payload_program_argv(python, root) + ["-I", "-S", payload_path("entry", role, root=root)]
