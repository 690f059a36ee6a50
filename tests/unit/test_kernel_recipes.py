"""kernels/make.py: the recipes build.py reads, the fragment check, the ELF taken out of
Debian's bzImage, and modules.devname moved aside (read back with the guest's reader,
guest/world.static_nodes, as the contract between the build and the guest's init)."""
import lzma

import pytest

from unitutil import REPO
from kernels.make import config_lost, extract_vmlinux, recipes


# --- vmlinux -----------------------------------------------------------------------

ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def test_extract_vmlinux():
    setup = b"MZ" + b"\0" * 510 + b"HdrS" + b"\x55" * 3000
    bzimage = setup + lzma.compress(ELF, format=lzma.FORMAT_XZ) + b"\x00\x40\x00\x00" * 4
    assert extract_vmlinux(bzimage) == ELF


def test_extract_vmlinux_not_xz():
    with pytest.raises(SystemExit) as info:
        extract_vmlinux(b"MZ" + b"\0" * 100 + lzma.compress(ELF, format=lzma.FORMAT_ALONE))
    assert "not xz" in str(info.value)


def test_extract_vmlinux_not_elf():
    with pytest.raises(SystemExit) as info:
        extract_vmlinux(b"MZ" + lzma.compress(b"#!not an elf", format=lzma.FORMAT_XZ))
    assert "not an ELF" in str(info.value)


# --- recipes -------------------------------------------------------------------------

def test_the_recipes_are_the_kernels_the_options_name():
    """The default kernel has a recipe, and each recipe says how it boots."""
    from dkvm.options import BY_ENV
    found = recipes()
    assert BY_ENV["DKVM_KERNEL"].default in found
    assert {"dkvm", "debian"} <= set(found)
    for name, recipe in found.items():
        assert isinstance(recipe["boot"]["initramfs"], bool), name
    assert found["dkvm"]["boot"]["initramfs"] is False          # the fast path: none


def test_every_built_in_choice_of_the_fragment_is_explained():
    """Each group of CONFIG_ lines follows a comment that says who needs it."""
    lines = (REPO / "kernels" / "dkvm" / "config").read_text().splitlines()
    explained = False
    for line in lines:
        if line.startswith("#"):
            explained = True
        elif not line.strip():
            explained = False
        else:
            assert explained, f"no comment above {line}"


def test_config_lost_names_lines_that_did_not_hold():
    fragment = 'CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is a comment\nCONFIG_D=n\nCONFIG_E="-x"\n'
    config = 'CONFIG_A=y\nCONFIG_B=y\n# CONFIG_D is not set\nCONFIG_E="-x"\n'
    assert config_lost(fragment, config) == ["CONFIG_B=m"]
    assert config_lost("CONFIG_F=y\n", config) == ["CONFIG_F=y"]


# --- modules.devname -----------------------------------------------------------------

DEVNAME = "# Device nodes to trigger on-demand module loading.\ntun net/tun c10:200\n"


def test_the_payloads_module_trees_have_no_modules_devname(tmp_path):
    """systemd runs kmod-static-nodes.service where /lib/modules/<release> has one (and
    fails in an image without kmod); the guest's init reads DKVM's copy."""
    from dkvm.guest.world import static_nodes
    from dkvm.paths import STATIC_NODES
    from kernels.make import rename_static_nodes
    modules = tmp_path / "lib" / "modules" / "6.1.0-dkvm"
    modules.mkdir(parents=True)
    (modules / "modules.devname").write_text(DEVNAME)
    rename_static_nodes(modules)
    assert not (modules / "modules.devname").exists()
    assert (modules / STATIC_NODES).read_text() == DEVNAME
    assert static_nodes(str(modules))[1] == "tun net/tun c10:200"
    rename_static_nodes(modules)                # a tree without one is left as it is
    assert (modules / STATIC_NODES).read_text() == DEVNAME
