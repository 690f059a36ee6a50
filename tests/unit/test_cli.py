"""The `dkvm` command (roles/cli): what its subcommands show."""
from unitutil import KERNELS
from dkvm.roles.cli import kernel_table


def test_dkvm_kernels_shows_release_boot_and_source_and_marks_the_default():
    lines = kernel_table(KERNELS)
    assert lines[0].split() == ["NAME", "RELEASE", "BOOT", "SOURCE"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) == {"debian", "dkvm*", "image"}
    assert "6.1.192-dkvm" in rows["dkvm*"] and "the export as root" in rows["dkvm*"]
    assert "initramfs" in rows["debian"]
    assert lines[-1].startswith("* the default")
