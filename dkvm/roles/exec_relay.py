"""dkvm-exec-relay: what `runc exec` starts in the container for `docker exec`. It
reads the request the runtime handed it as a descriptor (handoff: never its
environment, which is DKVM's, not the workload's), waits for the VM's multiplexer
(a pod member's exec: the pod's, on POD_SOCKET, into that member), puts the terminal
(with -t) in raw mode, and relays the exec into the guest; it leaves with the guest
process's exit status."""

from dkvm import log, paths, terminal
from dkvm.container.exec_relay import (ExecRelay, connect, make_raw, restore_terminal,
                                       yield_to_the_vm)
from dkvm.errors import DkvmError
from dkvm.schema import ExecRequest

CONNECT_TIMEOUT = 180       # a VM still booting: wait, then give up clearly


def main(argv):
    yield_to_the_vm()
    request = request_from(argv)
    log.set_container(request.container_id)
    sock = connect(paths.POD_SOCKET if request.member else paths.EXEC_SOCKET, CONNECT_TIMEOUT)
    tty = request.process.terminal
    relay = ExecRelay(sock, request.process, terminal.get_size(0) if tty else [],
                      member=request.container_id if request.member else "")
    saved = None
    if tty:
        relay.watch_resizes()
        saved = make_raw(0)
    try:
        return relay.run()
    finally:
        restore_terminal(0, saved)


def request_from(argv):
    """The request at the descriptor our arguments name: `--request-fd N`."""
    from dkvm.handoff import read_request
    words = argv[1:]
    if len(words) != 2 or words[0] != paths.EXEC_REQUEST_FD or not words[1].isdigit():
        raise DkvmError(f"dkvm-exec-relay takes {paths.EXEC_REQUEST_FD} N, as DKVM's runtime "
                        "starts it", 126)
    try:
        return ExecRequest.from_json(read_request(int(words[1])))
    except (OSError, ValueError) as err:
        raise DkvmError(f"the exec's request cannot be read ({err})", 126) from None
