"""DKVM_KERNEL=image: finding the image's kernel and building its initramfs from the
image's own modules, with the image's tree as hostile data (links resolved inside it,
every read bounded)."""
import gzip
import lzma
import os

import pytest

from unitutil import OpenWatch, load_config, parse_newc, rewrite, with_env
from dkvm.errors import DkvmError
from dkvm.boot.image_kernel import (boot_initramfs, bzimage_release, find_kernel, kernels_in,
                                    module_bytes, modules_dir, open_kernel)


def bzimage(release, size=4096):
    """The start of an x86 bzImage: the setup header, the version string it points to."""
    data = bytearray(size)
    data[0x202:0x206] = b"HdrS"
    version = f"{release} (debian-kernel@lists.debian.org) #1 SMP".encode()
    data[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    data[0x400:0x400 + len(version)] = version
    return bytes(data)


def module(name, depends=""):
    return (b"\x7fELF\0junk\0depends=" + depends.encode() + b"\0name=" + name.encode() + b"\0")


@pytest.fixture
def image(tmp_path):
    """A Debian-like image: merged /usr (lib -> usr/lib), /vmlinuz -> boot/vmlinuz-*,
    two kernels, modules for one of them (virtio_pci built in, virtiofs xz-compressed)."""
    root = tmp_path / "image"
    (root / "boot").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")
    (root / "boot" / "vmlinuz-6.1.0-9-amd64").write_bytes(bzimage("6.1.0-9-amd64"))
    (root / "boot" / "vmlinuz-6.1.0-10-amd64").write_bytes(bzimage("6.1.0-10-amd64"))
    os.symlink("boot/vmlinuz-6.1.0-9-amd64", root / "vmlinuz")
    mods = root / "usr" / "lib" / "modules" / "6.1.0-9-amd64"
    (mods / "kernel").mkdir(parents=True)
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    (mods / "modules.dep").write_text(
        "kernel/fs/fuse/fuse.ko:\n"
        "kernel/fs/fuse/virtiofs.ko.xz: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/char/virtio_console.ko.gz: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko "
        "kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/net/net_failover.ko:\n")
    files = {"fs/fuse/fuse.ko": module("fuse"),
             "fs/fuse/virtiofs.ko.xz": lzma.compress(module("virtiofs", "fuse,virtio_ring")),
             "drivers/virtio/virtio_ring.ko": module("virtio_ring"),
             "drivers/char/virtio_console.ko.gz": gzip.compress(module("virtio_console")),
             "drivers/net/virtio_net.ko": module("virtio_net", "net_failover,virtio_ring"),
             "drivers/net/net_failover.ko": module("net_failover")}
    for rel, data in files.items():
        (mods / "kernel" / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / "kernel" / rel).write_bytes(data)
    return root


def test_the_release_comes_from_the_bzimage_header():
    assert bzimage_release(bzimage("6.1.0-9-amd64")) == "6.1.0-9-amd64"
    assert bzimage_release(b"\x7fELF" + bytes(4096)) == ""
    assert bzimage_release(b"HdrS") == ""
    for evil in ("../../etc", "..", "."):
        assert bzimage_release(bzimage(evil)) == "", evil


def test_the_default_kernel_is_vmlinuz_then_the_newest(image):
    assert find_kernel(str(image)) == ("/vmlinuz", "6.1.0-9-amd64")
    assert find_kernel(str(image), "6.1.0-10-amd64") == ("/boot/vmlinuz-6.1.0-10-amd64",
                                                         "6.1.0-10-amd64")
    os.unlink(image / "vmlinuz")
    assert [r for _, r in kernels_in(str(image))] == ["6.1.0-10-amd64", "6.1.0-9-amd64"]
    assert find_kernel(str(image))[1] == "6.1.0-10-amd64"


def test_no_kernel_or_no_such_release_is_one_clear_error(image, tmp_path):
    with pytest.raises(DkvmError, match=r"image/5.10: the image has no such kernel; it has "
                                        r"6.1.0-10-amd64, 6.1.0-9-amd64"):
        find_kernel(str(image), "5.10")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DkvmError, match="the image has no kernel"):
        find_kernel(str(tmp_path / "empty"))


def test_links_in_the_image_stay_in_the_image(image, tmp_path):
    """/vmlinuz pointing at a host file (absolute, or up and out) is resolved inside the
    image: the host's file is never read."""
    outside = tmp_path / "host-kernel"
    outside.write_bytes(bzimage("6.6.6-host"))
    os.unlink(image / "vmlinuz")
    os.symlink(str(outside), image / "vmlinuz")
    os.symlink("../../../../../../" + str(outside), image / "boot" / "vmlinuz")
    releases = [release for _, release in kernels_in(str(image))]
    assert "6.6.6-host" not in releases


def test_the_initramfs_holds_the_images_boot_modules_uncompressed_in_order(image):
    archive = parse_newc(boot_initramfs(str(image), "6.1.0-9-amd64", b"BB", b"#!init"))
    mods = [(e["name"], e["data"]) for e in archive if e["name"].startswith("lib/modules/")
            and e["name"].endswith(".ko")]
    names = [name.split("-", 1)[1] for name, _ in mods]
    # virtio_pci is built in; each module after what it depends on
    assert names == ["fuse.ko", "virtio_ring.ko", "virtiofs.ko", "virtio_console.ko",
                     "net_failover.ko", "virtio_net.ko"]
    assert dict(mods)["lib/modules/02-virtiofs.ko"] == module("virtiofs", "fuse,virtio_ring")
    assert dict(mods)["lib/modules/03-virtio_console.ko"] == module("virtio_console")


def test_the_balloon_driver_is_loaded_when_the_kernel_has_it_as_a_module(image):
    mods = image / "usr" / "lib" / "modules" / "6.1.0-9-amd64"
    with open(mods / "modules.dep", "a") as dep:
        dep.write("kernel/drivers/virtio/virtio_balloon.ko: kernel/drivers/virtio/virtio_ring.ko\n")
    balloon = module("virtio_balloon", "virtio_ring")
    (mods / "kernel" / "drivers" / "virtio" / "virtio_balloon.ko").write_bytes(balloon)
    archive = parse_newc(boot_initramfs(str(image), "6.1.0-9-amd64", b"BB", b"#!init"))
    mods = {e["name"]: e["data"] for e in archive if e["name"].endswith(".ko")}
    assert mods["lib/modules/06-virtio_balloon.ko"] == balloon
    (image / "usr" / "lib" / "modules" / "6.1.0-9-amd64" / "modules.builtin").write_text(
        "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/virtio/virtio_balloon.ko\n")
    archive = parse_newc(boot_initramfs(str(image), "6.1.0-9-amd64", b"BB", b"#!init"))
    assert not [e for e in archive if "balloon" in e["name"]]


def test_missing_boot_modules_or_index_fail_naming_what(image):
    mods = image / "usr" / "lib" / "modules" / "6.1.0-9-amd64"
    (mods / "modules.builtin").write_text("")
    with pytest.raises(DkvmError, match="6.1.0-9-amd64: the kernel has no module virtio_pci"):
        boot_initramfs(str(image), "6.1.0-9-amd64", b"", b"")
    (mods / "modules.dep").unlink()
    with pytest.raises(DkvmError, match="no /lib/modules/6.1.0-9-amd64/modules.dep .run depmod"):
        boot_initramfs(str(image), "6.1.0-9-amd64", b"", b"")
    with pytest.raises(DkvmError, match="has no /lib/modules/6.1.0-10-amd64"):
        modules_dir(str(image), "6.1.0-10-amd64")


def test_a_module_bomb_or_an_unknown_compression_is_refused(image, monkeypatch):
    mods = image / "usr" / "lib" / "modules" / "6.1.0-9-amd64" / "kernel"
    (mods / "bomb.ko.xz").write_bytes(lzma.compress(bytes(1 << 20)))
    with pytest.raises(DkvmError, match="initramfs would be larger than 12 MiB .* with "
                                        "/lib/modules/6.1.0-9-amd64/kernel/bomb.ko.xz"):
        module_bytes(str(image), "/lib/modules/6.1.0-9-amd64/kernel/bomb.ko.xz", 1 << 16)
    assert len(module_bytes(str(image), "/lib/modules/6.1.0-9-amd64/kernel/bomb.ko.xz",
                            1 << 20)) == 1 << 20
    (mods / "z.ko.zst").write_bytes(b"(\xb5/\xfd")
    with pytest.raises(DkvmError, match="only .ko, .ko.xz and .ko.gz"):
        module_bytes(str(image), "/lib/modules/6.1.0-9-amd64/kernel/z.ko.zst", 1 << 20)
    (mods / "bad.ko.xz").write_bytes(b"not xz")
    with pytest.raises(DkvmError, match="does not decompress"):
        module_bytes(str(image), "/lib/modules/6.1.0-9-amd64/kernel/bad.ko.xz", 1 << 20)
    (mods / "cut.ko.gz").write_bytes(gzip.compress(bytes(1 << 16))[:-20])
    with pytest.raises(DkvmError, match="does not decompress: it ends early"):
        module_bytes(str(image), "/lib/modules/6.1.0-9-amd64/kernel/cut.ko.gz", 1 << 20)


def test_an_xz_module_that_asks_for_a_huge_dictionary_is_refused(image):
    """The decoder's memory is what the file's header asks for: bounded here."""
    mods = image / "usr" / "lib" / "modules" / "6.1.0-9-amd64" / "kernel"
    filters = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 30}]
    (mods / "big.ko.xz").write_bytes(lzma.compress(b"x" * 1000, filters=filters))
    with pytest.raises(DkvmError, match="does not decompress"):
        module_bytes(str(image), "/lib/modules/6.1.0-9-amd64/kernel/big.ko.xz", 1 << 20)


def test_the_initramfs_is_capped_in_total_before_anything_is_written(image, monkeypatch):
    """Each module fits, all of them do not: one line naming the cap (the container's
    /run is a 16 MiB tmpfs; an initramfs over it failed with ENOSPC)."""
    import dkvm.boot.image_kernel as image_kernel
    mods = image / "usr" / "lib" / "modules" / "6.1.0-9-amd64" / "kernel"
    (mods / "fs" / "fuse" / "fuse.ko").write_bytes(module("fuse") + bytes(6 << 20))
    (mods / "drivers" / "net" / "net_failover.ko").write_bytes(module("x") + bytes(6 << 20))
    with pytest.raises(DkvmError, match=r"^DKVM_KERNEL=image: the initramfs would be larger "
                                        r"than 12 MiB \(the container's /run holds 16 MiB\) "
                                        r"with /lib/modules/6.1.0-9-amd64/kernel/drivers/net/"
                                        r"net_failover.ko$"):
        boot_initramfs(str(image), "6.1.0-9-amd64", b"BB", b"#!init")
    # busybox and init count too
    monkeypatch.setattr(image_kernel, "INITRAMFS_LIMIT", 1 << 20)
    with pytest.raises(DkvmError, match="larger than 1 MiB"):
        boot_initramfs(str(image), "6.1.0-9-amd64", bytes(1 << 20), b"#!init")


def write_dep(image, lines):
    mods = image / "usr" / "lib" / "modules" / "6.1.0-9-amd64"
    (mods / "modules.dep").write_text("".join(line + "\n" for line in lines))


def test_a_modules_dep_of_100k_lines_is_refused_at_once(image):
    import time
    write_dep(image, [f"kernel/m{i}.ko: kernel/m{i + 1}.ko" for i in range(100_000)])
    started = time.monotonic()
    with pytest.raises(DkvmError, match="modules.dep has more than 65536 lines"):
        boot_initramfs(str(image), "6.1.0-9-amd64", b"BB", b"#!init")
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("shape", ["chain", "wide"])
def test_a_deep_or_wide_dependency_graph_stops_at_the_module_cap(image, shape):
    """A chain as deep as the index allows (no RecursionError), or one module depending
    on all the others: one line, within seconds."""
    import time
    count = 65_000
    if shape == "chain":
        lines = [f"kernel/m{i}.ko: kernel/m{i + 1}.ko" for i in range(count)]
    else:
        lines = [f"kernel/m{i}.ko:" for i in range(1, count)]
        lines.append("kernel/m0.ko: " + " ".join(f"kernel/m{i}.ko" for i in range(1, count)))
    lines.append("kernel/drivers/virtio/virtio_ring.ko: kernel/m0.ko")
    lines.append("kernel/fs/fuse/virtiofs.ko.xz: kernel/drivers/virtio/virtio_ring.ko")
    write_dep(image, lines)
    started = time.monotonic()
    with pytest.raises(DkvmError, match=r"^DKVM_KERNEL=image: 6.1.0-9-amd64: more than 64 "
                                        r"modules to load at boot$"):
        boot_initramfs(str(image), "6.1.0-9-amd64", b"BB", b"#!init")
    assert time.monotonic() - started < 3


def test_the_initramfs_is_written_to_run_or_fails_in_one_line(image, monkeypatch, tmp_path):
    import dkvm.boot.image_kernel as image_kernel
    from dkvm.schema import Boot
    payload = tmp_path / "payload"
    (payload / "bin").mkdir(parents=True)
    (payload / "bin" / "busybox").write_bytes(b"BB")
    (payload / "init").write_bytes(b"#!init")
    monkeypatch.setattr(image_kernel.paths, "payload_path",
                        lambda *parts: str(payload / parts[-1] if parts[-1] == "init"
                                           else payload.joinpath(*parts)))
    monkeypatch.setattr(image_kernel.paths, "IMAGE_INITRD", str(tmp_path / "initrd.img"))
    boot = Boot(name="image", release="6.1.0-9-amd64", kernel="/vmlinuz")
    fd = image_kernel.prepare_boot(boot, root=str(image))
    os.close(fd)
    written = (tmp_path / "initrd.img").read_bytes()
    assert written == boot_initramfs(str(image), "6.1.0-9-amd64", b"BB", b"#!init")
    monkeypatch.setattr(image_kernel.paths, "IMAGE_INITRD", "/dev/full")
    with pytest.raises(DkvmError, match=r"^DKVM_KERNEL=image: cannot write its initramfs to "
                                        r"the container's /run: No space left on device$"):
        image_kernel.prepare_boot(Boot(name="image", release="6.1.0-9-amd64",
                                       kernel="/vmlinuz"), root=str(image))


def test_the_kernel_opened_at_start_must_still_be_the_one_found_at_create(image):
    fd = open_kernel(str(image), "/vmlinuz", "6.1.0-9-amd64")
    os.close(fd)
    (image / "boot" / "vmlinuz-6.1.0-9-amd64").write_bytes(bzimage("6.6.6-swapped"))
    with pytest.raises(DkvmError, match="no longer 6.1.0-9-amd64"):
        open_kernel(str(image), "/vmlinuz", "6.1.0-9-amd64")


def test_the_modules_dir_is_where_the_image_really_keeps_it(image):
    assert modules_dir(str(image), "6.1.0-9-amd64") == \
        str(image / "usr" / "lib" / "modules" / "6.1.0-9-amd64")


def test_create_records_the_images_kernel(image, monkeypatch):
    from dkvm.host.bundle import BundleLayout
    monkeypatch.setattr(BundleLayout, "image_kernel",
                        lambda self, release: find_kernel(str(image), release))
    # the operator's choice, host-wide (a runtime argument)...
    _, plan = rewrite(load_config("plain"), defaults={"--dkvm-kernel": "image"})
    assert (plan.boot.name, plan.boot.release, plan.boot.kernel) == \
        ("image", "6.1.0-9-amd64", "/vmlinuz")
    assert plan.boot.from_image and plan.options.kernel == "image"
    # ...or a container's, where the policy allows it
    _, plan = rewrite(with_env(load_config("plain"), "DKVM_KERNEL=image/6.1.0-10-amd64"),
                      policy_allows={"DKVM_KERNEL=image"})
    assert plan.boot.release == "6.1.0-10-amd64"


def test_the_image_kernel_search_opens_no_fifo_device_or_file_outside(hostile):
    root, nodes = hostile
    with OpenWatch(*nodes) as watch:
        with pytest.raises(DkvmError, match="the image has no kernel"):
            find_kernel(str(root))
        with pytest.raises(DkvmError, match="cannot open the image's /vmlinuz: not a regular"):
            open_kernel(str(root), "/vmlinuz", "6.1.0")
        assert not watch.opened()
