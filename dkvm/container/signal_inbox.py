"""Signals for a loop that selects: each becomes a byte on a pipe the loop watches."""
import os
import signal


class SignalInbox:
    """Signals as bytes on a pipe (signal.set_wakeup_fd), so that the loop wakes at
    once for each and none is lost while the VM boots. Python never raises
    InterruptedError from select (PEP 475): a flag set by a handler would wait out
    the loop's timeout."""

    def __init__(self, signals):
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.previous = {sig: signal.signal(sig, self.ignore) for sig in signals}
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)

    @staticmethod
    def ignore(signum, frame):
        """The byte on the pipe is the delivery; a handler must exist for it."""

    def fileno(self):
        return self.read_fd

    def take(self):
        try:
            return list(os.read(self.read_fd, 4096))
        except BlockingIOError:
            return []

    def close(self):
        signal.set_wakeup_fd(self.previous_fd)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.close(self.read_fd)
        os.close(self.write_fd)
