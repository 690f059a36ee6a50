"""A QMP client for a QEMU of ours: hot-plugging NICs, the export and disks, saving
and restoring templates.

QMP is line-delimited JSON on the socket QEMU serves at /.dkvm/run/qmp.sock. Events
may arrive between a command and its answer; they are kept for `wait_event`.
"""
import json
import socket
import time

from dkvm.errors import DkvmError

TIMEOUT = 10


class Qmp:
    def __init__(self, path, timeout=TIMEOUT):
        self.sock = connect(path, timeout)
        self.buffer = b""
        self.events = []
        self.read_message()                 # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command, fd=None, **arguments):
        """Run one command; its result, or a DkvmError with QEMU's own description.
        `fd` goes with the command (SCM_RIGHTS), for `getfd`."""
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        data = json.dumps(request).encode() + b"\n"
        if fd is not None:
            sent = socket.send_fds(self.sock, [data], [fd])
            data = data[sent:]
        self.sock.sendall(data)
        while True:
            message = self.read_message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise DkvmError(f"QEMU refused {command}: {message['error'].get('desc')}")
            self.events.append(message)

    def wait_event(self, name, matches, timeout):
        """The first event called `name` whose data `matches`, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("event") == name and matches(event.get("data", {})):
                    self.events.remove(event)
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                self.events.append(self.read_message())
            except (socket.timeout, TimeoutError):
                return None
            finally:
                self.sock.settimeout(TIMEOUT)

    def read_message(self):
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise DkvmError("QEMU's monitor closed the connection")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self):
        self.sock.close()


def connect(path, timeout):
    """QEMU creates its monitor's socket as it starts: a moment's wait is normal."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except OSError as err:
            sock.close()
            if time.monotonic() > deadline:
                raise DkvmError(f"cannot reach QEMU's monitor at {path}: {err}") from None
        time.sleep(0.05)
