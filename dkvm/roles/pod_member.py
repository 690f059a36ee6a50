"""dkvm-pod-member: the process of a Kubernetes pod's app container (host.pods), whose
VM is the pod's. It catches signals from the first moment (they are the member's),
reads its plan from its root as the entrypoint does, connects to the pod's sandbox
(POD_SOCKET) and sends the member's start with its export (its directory and mount
namespace, and its volumes: the sandbox serves them); then it relays the member's
stdio, resizes and signals, and leaves with the member's exit status."""
from dkvm import log, paths, terminal
from dkvm.container.exec_relay import connect, make_raw, restore_terminal
from dkvm.container.pod_member import MemberRelay, complete_member_plan, export_fds
from dkvm.container.signal_inbox import SignalInbox
from dkvm.handoff import own_plan

CONNECT_TIMEOUT = 180       # the pod's VM still booting: wait, then give up clearly


def main(argv):
    signals = SignalInbox()
    plan = own_plan("/")
    log.set_container(plan.container_id)
    tty = plan.process.terminal
    winsize = terminal.get_size(0) if tty else []
    complete_member_plan(plan, winsize)
    sock = connect(paths.POD_SOCKET, CONNECT_TIMEOUT, "this container")
    relay = MemberRelay(sock, plan, export_fds(volumes=len(plan.pod_volumes)), signals,
                        winsize)
    saved = make_raw(0) if tty else None
    try:
        return relay.run()
    finally:
        restore_terminal(0, saved)
