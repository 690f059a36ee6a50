"""Whether anything opened a node: inotify's IN_OPEN, which every open(2) of the inode
raises (of a FIFO, a device, a file) and an O_PATH descriptor does not. A test that
makes the host's code face an image's FIFO or device asserts with it that the node was
never opened, without having to survive the open (a FIFO would block it forever)."""
import ctypes
import os

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
