"""dkvm.boot.initramfs: the newc archive, module names, dependencies and load order (the
same code builds the stock kernel's initramfs at build time and the image kernel's at
start)."""
import shutil
import stat
import subprocess

import pytest

from unitutil import parse_newc
from dkvm.errors import DkvmError
from dkvm.boot.initramfs import cpio_newc, initramfs, load_order, modinfo_depends, module_name


def order_of(wanted, modules):
    """load_order with each module's dependencies read from its own .modinfo."""
    return load_order(wanted, lambda name: modinfo_depends(modules[name].read_bytes()))


# --- cpio --------------------------------------------------------------------------

ENTRIES = [
    ("bin", 0o40755, None),
    ("dev", 0o40755, None),
    ("dev/console", 0o20600, None, (5, 1)),
    ("bin/busybox", 0o100755, b"\x7fELF" + b"b" * 1001),
    ("init", 0o100755, b"#!/bin/busybox sh\nexec /bin/sh\n"),
    ("lib/modules/00-virtio.ko", 0o100644, b"abc"),
    ("empty", 0o100644, b""),
]


def test_cpio_newc_parses():
    data = cpio_newc(ENTRIES)
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


def test_cpio_newc_is_deterministic():
    assert cpio_newc(ENTRIES) == cpio_newc(list(ENTRIES))
    assert cpio_newc(ENTRIES) != cpio_newc(ENTRIES[:-1])


def test_cpio_newc_non_ascii_name():
    data = cpio_newc([("lib/caf\u00e9", 0o100644, b"x")])
    (entry, _) = parse_newc(data)
    assert entry["name"] == "lib/caf\u00e9" and entry["data"] == b"x"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio(1)")
def test_cpio_newc_readable_by_cpio(tmp_path):
    out = subprocess.run(["cpio", "-it", "--quiet"], input=cpio_newc(ENTRIES),
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


def assert_deps_first(order, modules):
    for i, name in enumerate(order):
        for dep in modinfo_depends(modules[name].read_bytes()):
            assert dep in order[:i], (dep, name, order)


def test_module_depends(modules):
    assert modinfo_depends(modules["virtio_pci"].read_bytes()) == [
        "virtio_pci_modern_dev", "virtio", "virtio_ring", "virtio_pci_legacy_dev"]
    assert modinfo_depends(modules["fuse"].read_bytes()) == []


def test_module_depends_without_modinfo(tmp_path):
    path = tmp_path / "x.ko"
    path.write_bytes(b"\x7fELF no modinfo here")
    assert modinfo_depends(path.read_bytes()) == []


def test_module_load_order(modules):
    order = order_of(["virtio_pci", "virtiofs", "virtio_console"], modules)
    assert len(order) == len(set(order))
    assert set(order) == set(modules)
    assert_deps_first(order, modules)
    # depth first, dependencies in the order modinfo lists them
    assert order == ["virtio_pci_modern_dev", "virtio", "virtio_ring", "virtio_pci_legacy_dev",
                     "virtio_pci", "fuse", "virtiofs", "virtio_console"]


def test_module_load_order_simple(tmp_path):
    mods = {"a": write_module(tmp_path, "a", ""), "b": write_module(tmp_path, "b", "a"),
            "c": write_module(tmp_path, "c", "a,b")}
    assert order_of(["c"], mods) == ["a", "b", "c"]
    assert order_of(["c", "a"], mods) == ["a", "b", "c"]
    assert order_of(["a"], mods) == ["a"]


def test_module_load_order_missing(tmp_path):
    mods = {"a": write_module(tmp_path, "a", ""),
            "c": write_module(tmp_path, "c", "a,b")}
    with pytest.raises(DkvmError) as info:
        order_of(["c"], mods)
    assert "no module b" in str(info.value)
    with pytest.raises(DkvmError) as info:
        order_of(["zz"], mods)
    assert "no module zz" in str(info.value)


def test_module_load_order_cycle(tmp_path):
    mods = {"a": write_module(tmp_path, "a", "b"), "b": write_module(tmp_path, "b", "a")}
    with pytest.raises(DkvmError) as info:
        order_of(["a"], mods)
    assert "cycle" in str(info.value)


def test_module_load_order_of_a_chain_deeper_than_the_stack_is_iterative():
    """100k modules each needing the next: no RecursionError, linear time."""
    import time
    count = 100_000
    started = time.monotonic()
    order = load_order(["m0"], lambda name: [f"m{int(name[1:]) + 1}"]
                       if int(name[1:]) < count else [])
    assert order == [f"m{i}" for i in range(count, -1, -1)]
    assert time.monotonic() - started < 2


def test_module_load_order_of_a_wide_graph_is_linear():
    import time
    count = 100_000
    deps = {"top": [f"m{i}" for i in range(count)] * 2}
    started = time.monotonic()
    order = load_order(["top"], lambda name: deps.get(name, []))
    assert len(order) == count + 1 and order[-1] == "top"
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("wide", [False, True])
def test_module_load_order_stops_at_the_first_module_over_the_cap(wide):
    asked = []

    def depends_of(name):
        asked.append(name)
        if wide:
            return [f"m{i}" for i in range(1000)] if name == "top" else []
        return [name + "x"]
    with pytest.raises(DkvmError, match="^more than 64 modules to load at boot$"):
        load_order(["top"], depends_of, most=64)
    assert len(asked) == 64
    assert load_order(["a"], lambda name: [], most=1) == ["a"]


def test_module_names_as_the_kernel_spells_them():
    assert module_name("kernel/drivers/virtio/virtio-pci.ko.xz") == "virtio_pci"
    assert module_name("virtiofs.ko") == "virtiofs"
    assert module_name("nf_tables.ko.zst") == "nf_tables"
    assert module_name("crc32c-intel") == "crc32c_intel"


def test_initramfs_holds_init_busybox_and_modules_in_load_order():
    entries = {e["name"]: e for e in parse_newc(initramfs(b"BB", b"#!init", [("b", b"B"),
                                                                            ("a", b"A")]))}
    assert entries["init"]["data"] == b"#!init" and entries["bin/busybox"]["data"] == b"BB"
    assert stat.S_IMODE(entries["init"]["mode"]) == 0o755
    mods = sorted(name for name in entries if name.startswith("lib/modules/"))
    assert mods == ["lib/modules/00-b.ko", "lib/modules/01-a.ko"]
    assert entries["lib/modules/01-a.ko"]["data"] == b"A"
    assert stat.S_ISCHR(entries["dev/console"]["mode"])
