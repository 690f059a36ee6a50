"""A template's RAM file is sparse: what the guest never touched, or left zero, is a
hole, made here when the template is saved (host.templates) and skipped when it is
copied into a VM (container.restore)."""
import os

PAGE = 4096
ZERO_SCAN = 1 << 20
FALLOC_PUNCH_HOLE = 0x2 | 0x1   # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def punch_zero_pages(fd):
    """Make the RAM file's pages of zeros holes: a page the guest touched and left
    zero (about 12 MiB of the default template) is then not copied into every VM."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    size = os.fstat(fd).st_size
    zero = bytes(PAGE)
    for start, end in data_extents(fd, size):
        for offset in range(start, end, ZERO_SCAN):
            chunk = os.pread(fd, min(ZERO_SCAN, end - offset), offset)
            run = None                  # the first zero page of the current run
            for page in range(0, len(chunk) + PAGE, PAGE):
                if page < len(chunk) and chunk[page:page + PAGE] == zero:
                    run = page if run is None else run
                elif run is not None:
                    if libc.fallocate(fd, FALLOC_PUNCH_HOLE, ctypes.c_long(offset + run),
                                      ctypes.c_long(page - run)) != 0:
                        return          # a file system that cannot: the copy is only bigger
                    run = None


def data_extents(fd, size):
    """(start, end) of each run of data in the file (SEEK_DATA, SEEK_HOLE)."""
    offset, extents = 0, []
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:                 # ENXIO: only a hole from here on
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        offset = end
    return extents
