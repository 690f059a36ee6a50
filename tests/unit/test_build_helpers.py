"""The pure helpers of build.py: initramfs cpio, module order, vmlinux extraction and
the build id digest."""
import importlib.util
import lzma
import os
import shutil
import stat
import subprocess

import pytest

from unitutil import REPO


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("dkvm_build_under_test", REPO / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- cpio --------------------------------------------------------------------------

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


ENTRIES = [
    ("bin", 0o40755, None),
    ("dev", 0o40755, None),
    ("dev/console", 0o20600, None, (5, 1)),
    ("bin/busybox", 0o100755, b"\x7fELF" + b"b" * 1001),
    ("init", 0o100755, b"#!/bin/busybox sh\nexec /bin/sh\n"),
    ("lib/modules/00-virtio.ko", 0o100644, b"abc"),
    ("empty", 0o100644, b""),
]


def test_cpio_newc_parses(build):
    data = build.cpio_newc(ENTRIES)
    assert data.startswith(b"070701")
    entries = parse_newc(data)
    assert [e["name"] for e in entries] == [e[0] for e in ENTRIES] + ["TRAILER!!!"]
    by_name = {e["name"]: e for e in entries}
    for name, mode, content, *_ in ENTRIES:
        e = by_name[name]
        assert e["mode"] == mode
        assert e["data"] == (content or b"")
        assert e["filesize"] == len(content or b"")
        assert (e["uid"], e["gid"], e["mtime"]) == (0, 0, 0)
    console = by_name["dev/console"]
    assert stat.S_ISCHR(console["mode"])
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    assert (by_name["init"]["rdevmajor"], by_name["init"]["rdevminor"]) == (0, 0)
    assert by_name["bin"]["nlink"] == 2 and by_name["init"]["nlink"] == 1
    inos = [e["ino"] for e in entries[:-1]]
    assert len(set(inos)) == len(inos) and 0 not in inos
    trailer = entries[-1]
    assert (trailer["mode"], trailer["filesize"], trailer["ino"]) == (0, 0, 0)


def test_cpio_newc_is_deterministic(build):
    assert build.cpio_newc(ENTRIES) == build.cpio_newc(list(ENTRIES))
    assert build.cpio_newc(ENTRIES) != build.cpio_newc(ENTRIES[:-1])


def test_cpio_newc_non_ascii_name(build):
    data = build.cpio_newc([("lib/caf\u00e9", 0o100644, b"x")])
    (entry, _) = parse_newc(data)
    assert entry["name"] == "lib/caf\u00e9" and entry["data"] == b"x"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio(1)")
def test_cpio_newc_readable_by_cpio(build, tmp_path):
    out = subprocess.run(["cpio", "-it", "--quiet"], input=build.cpio_newc(ENTRIES),
                         capture_output=True, check=True)
    assert out.stdout.decode().split() == [e[0] for e in ENTRIES]


# --- module order ------------------------------------------------------------------

def write_module(tmp_path, name, depends):
    path = tmp_path / f"{name.replace('_', '-')}.ko"
    path.write_bytes(b"\x7fELF\0\0junk\0license=GPL\0depends=" + depends.encode()
                     + b"\0retpoline=Y\0name=" + name.encode() + b"\0vermagic=6.1\0")
    return path


@pytest.fixture
def modules(tmp_path):
    specs = {
        "virtio": "",
        "virtio_ring": "",
        "virtio_pci_modern_dev": "",
        "virtio_pci_legacy_dev": "",
        "virtio_pci": "virtio_pci_modern_dev,virtio,virtio-ring,virtio_pci_legacy_dev",
        "fuse": "",
        "virtiofs": "fuse,virtio_ring,virtio",
        "virtio_console": "virtio,virtio_ring",
    }
    return {name: write_module(tmp_path, name, deps) for name, deps in specs.items()}


def assert_deps_first(order, modules, build):
    for i, name in enumerate(order):
        for dep in build.module_depends(modules[name]):
            assert dep in order[:i], (dep, name, order)


def test_module_depends(build, modules):
    assert build.module_depends(modules["virtio_pci"]) == [
        "virtio_pci_modern_dev", "virtio", "virtio_ring", "virtio_pci_legacy_dev"]
    assert build.module_depends(modules["fuse"]) == []


def test_module_depends_without_modinfo(build, tmp_path):
    path = tmp_path / "x.ko"
    path.write_bytes(b"\x7fELF no modinfo here")
    assert build.module_depends(path) == []


def test_module_load_order(build, modules):
    order = build.module_load_order(["virtio_pci", "virtiofs", "virtio_console"], modules)
    assert len(order) == len(set(order))
    assert set(order) == set(modules)
    assert_deps_first(order, modules, build)
    # depth first, dependencies in the order modinfo lists them
    assert order == ["virtio_pci_modern_dev", "virtio", "virtio_ring", "virtio_pci_legacy_dev",
                     "virtio_pci", "fuse", "virtiofs", "virtio_console"]


def test_module_load_order_simple(build, tmp_path):
    mods = {"a": write_module(tmp_path, "a", ""), "b": write_module(tmp_path, "b", "a"),
            "c": write_module(tmp_path, "c", "a,b")}
    assert build.module_load_order(["c"], mods) == ["a", "b", "c"]
    assert build.module_load_order(["c", "a"], mods) == ["a", "b", "c"]
    assert build.module_load_order(["a"], mods) == ["a"]


def test_module_load_order_missing(build, tmp_path):
    mods = {"a": write_module(tmp_path, "a", ""),
            "c": write_module(tmp_path, "c", "a,b")}
    with pytest.raises(SystemExit) as info:
        build.module_load_order(["c"], mods)
    assert "no module b" in str(info.value)
    with pytest.raises(SystemExit) as info:
        build.module_load_order(["zz"], mods)
    assert "no module zz" in str(info.value)


def test_module_load_order_cycle(build, tmp_path):
    mods = {"a": write_module(tmp_path, "a", "b"), "b": write_module(tmp_path, "b", "a")}
    with pytest.raises(SystemExit) as info:
        build.module_load_order(["a"], mods)
    assert "cycle" in str(info.value)


# --- vmlinux -----------------------------------------------------------------------

ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def test_extract_vmlinux(build):
    setup = b"MZ" + b"\0" * 510 + b"HdrS" + b"\x55" * 3000
    bzimage = setup + lzma.compress(ELF, format=lzma.FORMAT_XZ) + b"\x00\x40\x00\x00" * 4
    assert build.extract_vmlinux(bzimage) == ELF


def test_extract_vmlinux_not_xz(build):
    with pytest.raises(SystemExit) as info:
        build.extract_vmlinux(b"MZ" + b"\0" * 100 + lzma.compress(ELF, format=lzma.FORMAT_ALONE))
    assert "not xz" in str(info.value)


def test_extract_vmlinux_not_elf(build):
    with pytest.raises(SystemExit) as info:
        build.extract_vmlinux(b"MZ" + lzma.compress(b"#!not an elf", format=lzma.FORMAT_XZ))
    assert "not an ELF" in str(info.value)


# --- tree digest -------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "a" / "payload"
    (root / "bin").mkdir(parents=True)
    (root / "lib" / "empty").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"tool v1")
    (root / "bin" / "tool").chmod(0o755)
    (root / "lib" / "libx.so").write_bytes(b"\0" * 100)
    (root / "lib" / "libx.so").chmod(0o644)
    return root


def test_tree_digest_stable(build, tree, tmp_path):
    first = build.tree_digest(tree)
    assert len(first) == 16 and int(first, 16) >= 0
    assert build.tree_digest(tree) == first
    # the same tree elsewhere has the same id
    copy = tmp_path / "b" / "payload"
    shutil.copytree(tree, copy)
    assert build.tree_digest(copy) == first


def test_tree_digest_content(build, tree):
    first = build.tree_digest(tree)
    (tree / "bin" / "tool").write_bytes(b"tool v2")
    changed = build.tree_digest(tree)
    assert changed != first
    (tree / "bin" / "tool").write_bytes(b"tool v1")
    assert build.tree_digest(tree) == first


def test_tree_digest_mode(build, tree):
    first = build.tree_digest(tree)
    os.chmod(tree / "bin" / "tool", 0o644)
    assert build.tree_digest(tree) != first
    os.chmod(tree / "bin" / "tool", 0o755)
    assert build.tree_digest(tree) == first


def test_tree_digest_names_and_dirs(build, tree):
    first = build.tree_digest(tree)
    (tree / "lib" / "empty" / "sub").mkdir()
    assert build.tree_digest(tree) != first
    (tree / "lib" / "empty" / "sub").rmdir()
    (tree / "lib" / "libx.so").rename(tree / "lib" / "liby.so")
    assert build.tree_digest(tree) != first


def test_tree_digest_several_roots(build, tree, tmp_path):
    other = tmp_path / "a" / "site-packages"
    other.mkdir()
    (other / "m.py").write_text("x = 1\n")
    both = build.tree_digest(tree, other)
    assert both != build.tree_digest(tree)
    (other / "m.py").write_text("x = 2\n")
    assert build.tree_digest(tree, other) != both
