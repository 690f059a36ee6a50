"""boot.sparse: a saved RAM file's zero pages punched out, its data found again."""
import os

from dkvm.boot.sparse import data_extents, punch_zero_pages
from unitutil import sparse_file

MIB = 1 << 20


def test_zero_pages_of_a_saved_ram_file_become_holes(tmp_path):
    size = 8 * MIB
    ram = sparse_file(tmp_path / "ram", size, [(0, b"a" * 4096 + b"\0" * (2 * MIB) + b"b")])
    fd = os.open(ram, os.O_RDWR)
    try:
        punch_zero_pages(fd)
        assert sum(end - start for start, end in data_extents(fd, size)) == 2 * 4096
        assert os.pread(fd, 4097, 0) == b"a" * 4096 + b"\0"
        assert os.pread(fd, 1, 4096 + 2 * MIB) == b"b"
    finally:
        os.close(fd)
