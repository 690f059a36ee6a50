"""Shared helpers for the unit tests: the captured dockerd configs, a rewrite wrapper
that returns the new config together with its plan, the runtime's stand-ins (Exec,
bundle_with; the `fake_host` fixture is in conftest), a strict newc reader and
OpenWatch (whether anything opened a node). The control channel's harnesses are in
`harness`."""
import ctypes
import json
import os
import stat
from pathlib import Path

from dkvm.handoff import read_plan
from dkvm.host.bundle import BundleLayout
from dkvm.host.facts import HostFacts
from dkvm.host.rewrite import rewrite_create_config
from dkvm.schema import Boot, Plan

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"

FIXTURE_NAMES = ["plain", "user-workdir-env", "resources-tmpfs-volume", "tty-init",
                 "privileged-cpuset", "flags", "cap-drop-all"]
KERNELS = {"debian": Boot(name="debian", release="6.1.0-28-amd64",
                          kernel="/.dkvm/kernels/debian/vmlinux",
                          initrd="/.dkvm/kernels/debian/initrd.img",
                          modules="/.dkvm/kernels/debian/lib/modules"),
           "dkvm": Boot(name="dkvm", release="6.1.192-dkvm",
                        kernel="/.dkvm/kernels/dkvm/vmlinux",
                        modules="/.dkvm/kernels/dkvm/lib/modules")}
PAYLOAD_DIR = "/var/lib/dkvm/0123456789abcdef"
CONTAINER_ID = "0123456789abcdef0123456789abcdef"
# Debian's containerd config.toml, for what `dkvm install` adds to it and takes back
CONTAINERD_CONFIG = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""
BUNDLE = "/run/containerd/io.containerd.runtime.v2.task/moby/" + CONTAINER_ID


def load_config(name):
    return json.loads((FIXTURES / f"config-{name}.json").read_text())


def facts(kvm_usable=False, defaults=None, kernels=None, policy_allows=()):
    """`defaults`: the runtime's arguments ({--dkvm-<option>: text}); `policy_allows`:
    what the host's policy file lets containers set."""
    return HostFacts(payload_dir=PAYLOAD_DIR, kvm_usable=kvm_usable,
                     kernels=dict(KERNELS if kernels is None else kernels),
                     defaults=dict(defaults or {}), policy_allows=policy_allows)


def plan_of(config):
    """The Plan the runtime wrote in the rewritten config's root, read as the
    entrypoint reads it; nothing of it is in the entrypoint's environment."""
    assert [e.partition("=")[0] for e in config["process"]["env"]] == ["PATH"]
    return Plan.from_json(read_plan(config["root"]["path"]))


def layout(config):
    """The captured configs' image roots are not on this machine: every destination
    resolves as written."""
    return BundleLayout(BUNDLE, config)


def rewrite(config, **kw):
    return rewrite_create_config(config, facts(**kw), layout(config), CONTAINER_ID)


def with_env(config, *items):
    """A copy of `config` whose process env has `items` appended."""
    config = json.loads(json.dumps(config))
    config["process"]["env"] = list(config["process"]["env"]) + list(items)
    return config


class Exec(Exception):
    """The runtime's execv of runc, stopped there by the `fake_host` fixture."""


def bundle_with(tmp_path, config):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def parse_newc(data):
    """A strict newc reader: list of dicts, TRAILER!!! included."""
    entries, off = [], 0
    fields = ["ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor",
              "devminor", "rdevmajor", "rdevminor", "namesize", "check"]
    while True:
        assert off % 4 == 0
        assert data[off:off + 6] == b"070701", off
        hdr = data[off + 6:off + 110]
        entry = {f: int(hdr[i * 8:i * 8 + 8], 16) for i, f in enumerate(fields)}
        name_end = off + 110 + entry["namesize"]
        raw_name = data[off + 110:name_end]
        assert raw_name.endswith(b"\0") and b"\0" not in raw_name[:-1]
        entry["name"] = raw_name[:-1].decode()
        off = name_end + (-name_end % 4)
        assert data[name_end:off] == b"\0" * (off - name_end)
        entry["data"] = data[off:off + entry["filesize"]]
        off += entry["filesize"]
        pad = -off % 4
        assert data[off:off + pad] == b"\0" * pad
        off += pad
        entries.append(entry)
        if entry["name"] == "TRAILER!!!":
            assert off == len(data)
            return entries


# Whether anything opened a node: inotify's IN_OPEN, which every open(2) of the inode
# raises (of a FIFO, a device, a file) and an O_PATH descriptor does not. A test that
# makes the host's code face an image's FIFO or device asserts with it that the node was
# never opened, without having to survive the open (a FIFO would block it forever).
IN_OPEN = 0x20
IN_NONBLOCK = 0o4000


class OpenWatch:
    def __init__(self, *paths):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for path in paths:
            if self.libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN) < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch", path)

    def opened(self):
        """True if a watched node was opened since the last call."""
        try:
            return bool(os.read(self.fd, 4096))
        except BlockingIOError:
            return False

    def close(self):
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# A tree that is not ours (dkvm.boot.rooted's readers, the image kernel's search): nothing
# but a regular file is ever opened, and a node's type is known before anything opens it.

def hostile_tree(root):
    """/vmlinuz a FIFO, /boot/vmlinuz a device node, /boot/vmlinuz-9 a link out of the
    tree to a real kernel-like file on the host; each FIFO has a reader ready, so that
    an open would return, not hang, and be seen."""
    (root / "boot").mkdir(parents=True)
    os.mkfifo(root / "vmlinuz")
    os.mknod(root / "boot/vmlinuz", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    host_file = root.parent / "host-kernel"
    host_file.write_bytes(b"HdrS" * 1024)
    os.symlink(host_file, root / "boot/vmlinuz-9")
    return [root / "vmlinuz", root / "boot/vmlinuz", host_file]


def sparse_file(path, size, chunks):
    """A file of `size` bytes holding only `chunks` ((offset, data)): the rest holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks:
            f.seek(offset)
            f.write(data)
    return path
