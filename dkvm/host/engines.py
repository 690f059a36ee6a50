"""What the engines DKVM serves mean by the config they write: the network namespace
they give a container, the capabilities a container has by default. (Where each looks
for runtimes is host/registrations.)"""
import os

from dkvm.errors import DkvmError

RUNTIME_NAME = "dkvm"
NETNS_DIRS = ("/run/netns", "/var/run/netns")      # where `ip netns`, CNI and engines keep them


def is_own_namespace(path, own="/proc/self/ns/net"):
    """Whether the namespace file at `path` is this process's own (the engine's: the
    host's). One that cannot be read is left to runc to refuse."""
    try:
        theirs, ours = os.stat(path), os.stat(own)
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def is_process_namespace(path):
    """/proc/PID/ns/net (normalised): a process's network namespace."""
    parts = path.split("/")
    return len(parts) == 5 and parts[:2] == ["", "proc"] and parts[2].isdigit() and \
        parts[2].isascii() and parts[3:] == ["ns", "net"]


class Docker:
    name = "docker"
    # what a container gets without --cap-add/--cap-drop: what the user dropped is
    # what is missing from it
    default_capabilities = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER",
                            "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID",
                            "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                            "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")

    # --- create: what the config's namespaces mean
    def check_network_namespace(self, linux, joins_pod=False):
        """The VM takes over the container's interfaces: it needs a network namespace
        made for the container. dockerd asks runc to create one (no path); Podman, CRI
        (containerd under Kubernetes) and `ctr --with-ns` make it themselves and give
        its path under /run/netns. Any other path is the host's namespace (dockerd
        names it .../netns/default) or another container's (/proc/PID/ns/net:
        --network container:NAME); so is a /run/netns path to the host's own. A pod's
        member (`joins_pod`: host.pods) has no VM and touches no interface: it may join
        its sandbox's, which CRI gives as /proc/PID/ns/net.
        Returns the path of an engine's namespace ("" for one runc makes)."""
        namespaces = linux.get("namespaces") or []
        net = [ns for ns in namespaces if ns.get("type") == "network"]
        path = (net[0].get("path") or "") if net else ""
        path = os.path.normpath(path) if path else ""
        if not net or os.path.basename(path) == "default" or (path and is_own_namespace(path)):
            raise DkvmError("--network host is not supported by DKVM: the VM needs a network "
                            "namespace of its own (use a bridge network, or --network none)")
        if joins_pod and is_process_namespace(path):
            return path
        if path and os.path.dirname(path) not in NETNS_DIRS:
            raise DkvmError("--network container:NAME is not supported by DKVM: the VM needs "
                            "a network namespace of its own (use a bridge network, or "
                            f"--network none); a namespace given by path must be in "
                            f"{' or '.join(NETNS_DIRS)}, not {path}")
        return path


DOCKER = Docker()
