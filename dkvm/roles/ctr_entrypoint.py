"""dkvm-ctr-entrypoint: PID 1 of the container, the VM's host side.

It catches signals from the first moment (they wait for the guest), makes a tap for
each of the container's network interfaces, makes the sockets QEMU and virtiofsd meet
on (in its private /run), and starts virtiofsd on the export and QEMU together, with
the DKVM_DISKS files and, for the image's own kernel, that kernel and an initramfs of
its modules; or QEMU restores the VM from its template (restore), and the export,
NICs and disks are hot-plugged once it runs. While the VM boots, it hands the
interfaces' addresses and frames to the taps (then follows `docker network connect`
and `disconnect` with hot-plugged NICs) and completes the plan with what only the
container can see. Then the supervisor serves the control channel (the guest asks it
for the plan first; a restored VM asked its template's maker) until the guest reports
the workload's exit status, which becomes ours. A network namespace the engine keeps
gets its interfaces back. A pod's sandbox also takes the pod's members (host.pods) on
POD_SOCKET, and serves its port-forwards (port_forward).
"""
import select
import socket
import time

from dkvm import log, paths
from dkvm.container.disks import open_disks
from dkvm.container.member_exports import sandbox_exports
from dkvm.container.net.follower import NetworkFollower
from dkvm.container.net.handover import Handover
from dkvm.container.net.plumbing import give_back_interfaces, ready_to_give_back
from dkvm.container.port_forward import PortForwarding
from dkvm.container.processes import VmProcesses, vm_vcpus
from dkvm.container.restore import Resumption, open_template
from dkvm.container.signal_inbox import SignalInbox
from dkvm.container.supervisor import Supervisor
from dkvm.container.net.taps import create_tap, guest_nics, tap_name
from dkvm.container.own_limits import own_rlimits
from dkvm.errors import DkvmError
from dkvm.handoff import own_plan
from dkvm.schema import POD_SANDBOX
from dkvm.terminal import get_size

CONNECT_TIMEOUT = 30        # QEMU connecting to the control and stdin sockets


def main(argv):
    signals = SignalInbox()
    plan = own_plan("/")
    log.set_container(plan.container_id)
    follower = NetworkFollower()        # listening first: nothing Docker does is missed
    nics = guest_nics()
    taps = [create_tap(tap_name(number), nic.mtu) for number, nic in enumerate(nics)]
    plan.interfaces = nics              # their MACs, for QEMU's NICs
    vm = VmProcesses()
    try:
        handover = Handover(nics, taps, docker_dns=not plan.network_namespace_kept,
                            monitor=follower.monitor)   # first: the longest to take
        control_listener = listen(paths.CONTROL_SOCKET)
        exec_listener = listen(paths.EXEC_SOCKET, backlog=64)
        signal_listener = listen(paths.SIGNAL_SOCKET, backlog=8)
        pod_listener = listen(paths.POD_SOCKET, backlog=64) if plan.pod == POD_SANDBOX else None
        stdin_listener = None if plan.process.terminal else listen(paths.STDIN_SOCKET)
        template = open_template(plan, vm_vcpus(plan))
        vm.start_virtiofsd(listen(paths.VIRTIOFS_SOCKET), plan)
        vm.start_qemu(plan, open_disks(plan.disks), open_boot_files(plan.boot), template)
        resuming = Resumption(plan, template, vm) if template else None
        control = accept_qemu(control_listener, vm)
        stdin_conn = accept_qemu(stdin_listener, vm) if stdin_listener else None
        interfaces, network_setup, routes = handover.result()
        complete_plan(plan, interfaces, network_setup, get_size(0) if plan.process.terminal else [])
        if resuming:
            resuming.finish()
        follower.start(plan.interfaces, paths.QMP_SOCKET, routes, taps)
        if plan.network_namespace_kept:
            ready_to_give_back()
        if pod_listener:
            PortForwarding(paths.EXEC_SOCKET).start()   # pyroute2 loaded: one thread's
        supervisor = Supervisor(control, exec_listener, follower.inbox, vm, signals, plan,
                                stdin_conn=stdin_conn, signal_listener=signal_listener,
                                restored=bool(template), pod_listener=pod_listener,
                                exports=sandbox_exports(plan, follower.shared_monitor))
        return supervisor.run()     # held to our end: its killers hear our exit (host.kill)
    finally:
        vm.stop()
        if plan.network_namespace_kept:
            give_back_interfaces(plan.interfaces, taps)


def complete_plan(plan, interfaces, network_setup, winsize):
    """The plan's fields only the container side fills (schema: set_by entrypoint): its
    interfaces and the guest's steps to rebuild them (net/handover), the terminal's
    size, and our resource limits (the engine's: what runc's would have had)."""
    plan.interfaces, plan.network_setup, plan.winsize = interfaces, network_setup, winsize
    plan.default_rlimits = own_rlimits(plan.engine_nofile)
    return plan


def open_boot_files(boot):
    """The fds QEMU needs to boot: the image's kernel for DKVM_KERNEL=image (and an
    initramfs of the image's modules); a kernel of the payload needs none."""
    if not boot.from_image:
        return []
    from dkvm.boot.image_kernel import prepare_boot
    return [prepare_boot(boot)]


def listen(path, backlog=1):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(backlog)
    return sock


def accept_qemu(listener, vm):
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([listener], [], [], 0.2)
        if ready:
            conn, _ = listener.accept()
            listener.close()
            return conn
        vm.check()
    raise DkvmError("QEMU did not connect to the control channel in time")
