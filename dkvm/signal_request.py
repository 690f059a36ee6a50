"""The runtime's request to a container's entrypoint to deliver a signal it cannot be
sent itself (SIGKILL, SIGSTOP: they would end or freeze the container side, not the
workload): the signal's number, in decimal, on a connection to paths.SIGNAL_SOCKET.
The entrypoint closes the connection once it has done what the signal asks, or by
exiting. Shared by the runtime (host) and the entrypoint (container)."""
from dkvm.kernel_names import SIGRTMAX

MAX_REQUEST = 8


def encode(signo):
    return f"{signo}\n".encode()


def parse(data):
    """The signal number in `data`; ValueError for anything else."""
    text = data.decode("ascii").strip()
    if not text.isdigit() or not 1 <= int(text) <= SIGRTMAX:
        raise ValueError(f"bad signal request {data[:MAX_REQUEST]!r}")
    return int(text)
