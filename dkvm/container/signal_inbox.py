"""Every signal the container is sent, for a loop that polls: all of them blocked from
the first moment and read from a signalfd, so that none is lost while the VM boots,
each arrives once and in order (real-time ones queue), and none interrupts the loop.
A fault of our own (SIGSEGV from a bad access) still kills: the kernel delivers a
blocked fault signal by its default action."""
import ctypes
import os
import signal
import struct

SFD_NONBLOCK, SFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
SIGINFO = struct.Struct("<IiiI")        # ssi_signo, ssi_errno, ssi_code, ssi_pid
SIGINFO_SIZE = 128
# every signal but the two no process can catch (and glibc's own two, 32 and 33,
# which valid_signals leaves out)
SIGNALS = sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP})


class SignalInbox:
    def __init__(self, signals=SIGNALS):
        self.previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        mask = bytearray(128)                   # a sigset_t: bit N-1 for signal N
        for sig in signals:
            mask[(sig - 1) // 8] |= 1 << ((sig - 1) % 8)
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.signalfd(-1, bytes(mask), SFD_NONBLOCK | SFD_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"signalfd: {os.strerror(err)}")

    def fileno(self):
        return self.fd

    def take(self):
        """The signals waiting, in order: (number, sender's pid). A sender outside
        this PID namespace (runc, in a container) and the kernel show as pid 0."""
        signals = []
        while True:
            try:
                data = os.read(self.fd, SIGINFO_SIZE * 64)
            except BlockingIOError:
                return signals
            for offset in range(0, len(data) - SIGINFO_SIZE + 1, SIGINFO_SIZE):
                signo, _, _, sender = SIGINFO.unpack_from(data, offset)
                signals.append((signo, sender))

    def close(self):
        os.close(self.fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.previous_mask)


def unblock_all_signals():
    """In a child before exec (QEMU, virtiofsd): the blocked mask is inherited."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
