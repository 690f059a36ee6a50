"""dkvm-vm-init: PID 1 in the guest. Started by a kernel that booted straight from the
export, it first builds the root the initramfs builds for the other kernels; started
by a template's initramfs, it is saved asking for its plan and restored into each
container's VM (host.templates), to take the export from there. It asks
the container side for the plan,
rebuilds the container's world in the VM, runs the workload as the container would
have, serves the control channel while it runs, reports its exit status to the
container side and powers the VM off.

The guest imports no module it can do without: each costs under TCG. (`_signal`,
`_socket`, `lightjson`: the standard modules around them pull in enum and re.)"""
import os
import _signal

from dkvm import log, paths, wire
from dkvm.guest import dns, syscalls, workload, world
from dkvm.guest.loop import GuestLoop, reap, receive_plan, report_exit, write_all

FATAL_STATUS = 125


def main(argv):
    control = None
    try:
        from_template = paths.FROM_TEMPLATE in argv[1:]
        if paths.ENTER_OWN_ROOT in argv[1:]:
            world.enter_own_root()
        elif from_template:
            world.enter_template_root()
        world.mount_init_filesystems()
        ports = world.find_ports(wanted=(paths.PORT_CONTROL,))
        control = os.open(ports[paths.PORT_CONTROL], os.O_RDWR | os.O_CLOEXEC)
        decoder = wire.Decoder()
        plan = receive_plan(control, decoder)
        log.set_container(plan.container_id)
        if from_template:
            world.resume_from_template(plan)
        if not plan.process.terminal:
            ports = world.find_ports(wanted=(paths.PORT_CONTROL, paths.PORT_STDIN,
                                             paths.PORT_STDOUT, paths.PORT_STDERR))
        world.serve_module_requests(plan)
        world.make_workload_cgroup(plan)
        console, starting = build_workload(plan, ports, world.attach_disks(plan))
        world.finish_network(world.apply_identity(plan))
        status = run_workload(plan, control, decoder, console, starting)
    except Exception as err:  # PID 1 must never die with a traceback: report and stop
        message = getattr(err, "message", None) or repr(err)   # a DkvmError's, or a bug's
        log.warn(message)
        if control is not None:
            write_all(control, wire.encode(wire.ERROR,
                                           {"message": f"guest init failed: {message}"}))
        status = FATAL_STATUS
    finish(control, status)


def build_workload(plan, ports, disks):
    """The workload's child, building its world meanwhile (workload.spawn), and the
    console when it has a terminal."""
    if plan.process.terminal:
        console, stdio = workload.open_console(plan.winsize), None
    else:
        console, stdio = None, world.open_stdio_ports(ports)
    starting = workload.spawn(plan, stdio, disks)
    for fd in stdio or ():
        os.close(fd)
    return console, starting


def run_workload(plan, control, decoder, console, starting):
    """Start the workload, say hello (the container side holds stdin and execs back
    until then: this guest kernel drops what arrives on a port nobody has open), then
    serve the control channel until the workload exits; its exit status."""
    pid = starting.start()
    forwarder = None
    if plan.interfaces and dns.uses_embedded_dns(paths.SHARED_ROOTFS + "/etc/resolv.conf"):
        forwarder = dns.GuestForwarder(plan.dns_upstream)
    loop = GuestLoop(control, pid, console=console, forwarder=forwarder, decoder=decoder,
                     default_rlimits=plan.default_rlimits)
    loop.send(wire.encode(wire.HELLO))
    return loop.run()


def finish(control, status):
    """End every process (as the end of PID 1 does in a container), report the status,
    wait for the container side to take it, and power off."""
    try:
        os.kill(-1, _signal.SIGKILL)
    except OSError:
        pass
    reap()
    os.sync()
    if control is not None:
        report_exit(control, status)
    syscalls.power_off()
