"""What the create rewrite needs to know about this host, gathered once per `create`:
the payload, KVM, the guest kernels, the engine, the host's name servers; and where
the real runc is."""
import fcntl
import os
import sys

from dkvm.errors import DkvmError

KVM_GET_API_VERSION = 0xAE00


class HostFacts:
    def __init__(self, payload_dir, kvm_usable, kernels, defaults=None, dns_upstream=(),
                 engine=None, policy_allows=()):
        from dkvm.host.engines import DOCKER
        self.payload_dir = payload_dir
        self.kvm_usable = kvm_usable
        self.kernels = dict(kernels)            # dist -> schema.Boot
        self.defaults = dict(defaults or {})    # the runtime args: --dkvm-<option> -> text
        self.policy_allows = frozenset(policy_allows)   # host.policy: what containers may set
        self.dns_upstream = list(dns_upstream)
        self.engine = engine or DOCKER


def gather_host_facts(defaults):
    from dkvm.host.payload import ensure_payload, payload_kernels
    from dkvm.host.policy import read_policy
    payload_dir = ensure_payload()
    return HostFacts(payload_dir=payload_dir, kvm_usable=kvm_usable(),
                     kernels=payload_kernels(payload_dir), defaults=defaults,
                     dns_upstream=upstream_nameservers(), policy_allows=read_policy())


def kvm_usable():
    """KVM that can boot a stock kernel. PVM (kvm_pvm) provides /dev/kvm but a stock
    kernel hangs under it, so it counts as unusable."""
    if os.path.isdir("/sys/module/kvm_pvm"):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def upstream_nameservers():
    """The name servers Docker's embedded DNS forwards to: the host's, or systemd-
    resolved's upstream list when the host points at its local stub."""
    for path in ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"):
        servers = []
        try:
            with open(path) as f:
                for line in f:
                    words = line.split()
                    if words[:1] == ["nameserver"] and len(words) > 1:
                        servers.append(words[1])
        except OSError:
            continue
        servers = [s for s in servers if not s.startswith("127.") and s != "::1" and ":" not in s]
        if servers:
            return servers
    return []


def find_runc(explicit=""):
    """The real runc: the one the runtime args name, or the distribution's."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise DkvmError(f"--dkvm-runc={explicit}: not an executable file")
        return explicit
    me = os.path.realpath(sys.argv[0])
    in_path = [os.path.join(folder, "runc") for folder in
               os.environ.get("PATH", os.defpath).split(os.pathsep) if folder]
    candidates = in_path + ["/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc",
                            "/usr/local/bin/runc"]
    for cand in candidates:
        if os.path.isfile(cand) and os.access(cand, os.X_OK) and os.path.realpath(cand) != me:
            return cand
    raise DkvmError("runc not found (looked in PATH, /usr/sbin, /usr/bin, /usr/local): "
                    "install runc or pass --dkvm-runc=PATH in the runtime's runtimeArgs")
