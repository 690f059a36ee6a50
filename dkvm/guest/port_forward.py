"""A pod's port-forward in the guest: a connection to localhost:PORT here, whose bytes
travel on an exec's channel (container.port_forward has the host's end).

The session is an exec's with a socket for its streams: what the relay sends is
written to the connection, what the server writes goes back within the window, the
relay's end of input is a half close, and the server's end of output ends the
session (status 0; 1 if it reset the connection: the relay resets its own then).
"""
import _socket

from dkvm.errors import DkvmError
from dkvm.guest.exec_session import ExecSession
from dkvm import wire

# A listener whose backlog is full drops the handshake and the kernel retries: PID 1
# waits for it at most this long (it serves nothing else meanwhile).
CONNECT_WAIT = 2
SERVER_RESET = 1


def connect_local(port, timeout=CONNECT_WAIT):
    """A non-blocking socket's fd connected to localhost:port, IPv4 first, as
    containerd dials it; DkvmError if neither family has a listener there."""
    failures = []
    for family, address in ((_socket.AF_INET, "127.0.0.1"), (_socket.AF_INET6, "::1")):
        sock = _socket.socket(family, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except OSError as err:
            failures.append(err.strerror or str(err))
            sock.close()
            continue
        sock.setblocking(False)
        return sock.detach()
    raise DkvmError(f"nothing accepts connections on localhost:{port} in the pod "
                    f"({failures[0]})")


def shutdown_write(fd):
    sock = _socket.socket(fileno=fd)
    try:
        sock.shutdown(_socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()


class ForwardSession(ExecSession):
    pid = None          # no process: the session ends with the server's output

    def __init__(self, channel, port, send):
        self.open_channel(channel, send)
        fd = connect_local(port)
        self.stdin_fd = fd
        self.outputs = {fd: wire.STDOUT}

    def end_stdin(self):
        shutdown_write(self.stdin_fd)

    def read_output(self, fd):
        try:
            more = super().read_output(fd)
        except OSError:                 # reset, or any other end the server made
            self.close_output(fd)
            self.on_exit(SERVER_RESET)
            return False
        if fd not in self.outputs and self.status is None:
            self.on_exit(0)             # the server closed its end
        return more

    def kill(self):
        """The relay is gone (its client): the connection closes with the session."""
        if self.status is None:
            self.status = 0
