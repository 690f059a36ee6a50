"""dkvm-exec: what `runc exec` starts in the container for `docker exec`. It takes
the request the runtime left in its environment, waits for the VM's multiplexer,
puts the terminal (with -t) in raw mode, and relays the exec into the guest; it
leaves with the guest process's exit status."""
import os

from dkvm import log, paths, terminal
from dkvm.container.exec_relay import ExecRelay, connect
from dkvm.schema import ExecRequest

CONNECT_TIMEOUT = 180       # a VM still booting: wait, then give up clearly


def main(argv):
    request = ExecRequest.from_json(os.environ[paths.EXEC_ENV])
    log.set_container(request.container_id)
    sock = connect(paths.EXEC_SOCKET, CONNECT_TIMEOUT)
    tty = request.process.terminal
    relay = ExecRelay(sock, request.process, terminal.get_size(0) if tty else [])
    saved = None
    if tty:
        relay.watch_resizes()
        saved = make_raw(0)
    try:
        return relay.run()
    finally:
        if saved is not None:
            import termios
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


def make_raw(fd):
    """The guest's terminal does the line discipline; ours must pass bytes as they are."""
    if not os.isatty(fd):
        return None
    import termios
    import tty
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    return saved
