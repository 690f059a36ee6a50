"""A pod's members' exports, served and hot-plugged into the pod's running VM
(host.pods).

Each member's container side (dkvm-pod-member) hands the sandbox's supervisor its
export with its MEMBER_START: a descriptor of its directory and one of its mount
namespace. Here a virtiofsd of the sandbox's serves that directory (chrooted into it
through /proc/self/fd: its submounts are the member's), on a listener made here and
connected to here; the connected socket becomes a chardev (QMP getfd, then
chardev-add on that descriptor) and a virtiofs device with a tag of its own ("m<N>",
never reused in the VM's life): the very device and virtiofsd options the container's
own export has (vmm). The mount namespace's descriptor is held until the export is
unplugged: the member's mounts live on while the guest may use them, even once the
member's relay (its container's PID 1) is gone. virtiofsd is the sandbox's, not the
member's, because one that dies with requests in flight wedges every virtiofs mount
of the guest until the VM restarts, and one that does not answer stalls QEMU: a
member killed only closes its channel. When the member has gone: device_del (the
guest lets go, ACPI eject), chardev-remove; virtiofsd ends at its socket's EOF.

QMP waits for QEMU, and an unplug for the guest: the calls run in a thread of their
own, so the supervisor's loop never stalls on them (exec streams, heartbeats). It
learns each plug's outcome from `inbox`, one datagram per plug."""
import os
import queue
import socket
import subprocess
import threading

from dkvm import log, paths
from dkvm.errors import DkvmError
from dkvm.container.processes import descriptors_open, most_descriptors
from dkvm.container.signal_inbox import unblock_all_signals
from dkvm.container.vmm import export_device, virtiofsd_argv
from dkvm.schema import POD_SANDBOX

UNPLUG_WAIT = 15            # s: the guest releasing a device (ACPI eject)
MOST_ERROR = 1000           # characters of QEMU's reason passed on to the member
STOP_WAIT = 5               # s: the thread finishing its job at close; virtiofsd ending


def member_tag(number):
    """The export's virtiofs tag (the guest mounts it by this name at MEMBERS_DIR/tag)
    and the name of its descriptor in QEMU's monitor."""
    return f"m{number}"


def volume_tag(number):
    """A pod volume's export's tag (container.pod_volumes), as a member's is."""
    return f"v{number}"


def is_volume_tag(tag):
    return tag.startswith("v")


def chardev_id(tag):
    return f"{tag}-vfs"


def device_id(tag):
    return f"{tag}-fs"


def chardev_backend(tag):
    """A vhost-user client on the connected socket the monitor holds as `tag`."""
    return {"type": "socket",
            "data": {"addr": {"type": "fd", "data": {"str": tag}}, "server": False}}


class DeviceUnknown(DkvmError):
    """device_add went unanswered: the device may be in the VM, its virtiofsd must stay."""


def plug(qmp, fd, tag):
    """The export whose vhost-user socket is `fd`, as virtiofs device `tag`; each step
    undone (best effort) if the next fails."""
    qmp.execute("getfd", fd=fd, fdname=tag)
    try:
        qmp.execute("chardev-add", id=chardev_id(tag), backend=chardev_backend(tag))
    except Exception:
        best_effort(qmp, "closefd", fdname=tag)     # chardev-add may have taken it
        raise
    try:
        qmp.execute("device_add", **export_device(chardev_id(tag), tag, device_id(tag)))
    except DkvmError:                           # QEMU's refusal: no device
        best_effort(qmp, "chardev-remove", id=chardev_id(tag))
        raise
    except Exception as err:
        raise DeviceUnknown(f"QEMU did not answer device_add ({err})") from None


def unplug(qmp, tag, wait=UNPLUG_WAIT):
    """The device asked away, then its chardev, once the guest released the device
    (a chardev in use cannot be removed)."""
    qmp.execute("device_del", id=device_id(tag))
    if not qmp.wait_event("DEVICE_DELETED", lambda data: data.get("device") == device_id(tag),
                          wait):
        log.warn(f"the guest did not release {device_id(tag)} within {wait}s")
    qmp.execute("chardev-remove", id=chardev_id(tag))


def start_virtiofsd(directory, tag, sys_admin=False):
    """virtiofsd serving the member's export at `directory` (a descriptor, passed to
    it), with the options of the container's own (a pod volume's: coherent, see
    vmm.virtiofsd_argv); (its process, our connected end of its socket). Its socket
    and log are in our private /run."""
    path = os.path.join(paths.RUN_DIR, f"{tag}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener.bind(path)
        listener.listen(1)
        argv = virtiofsd_argv(listener.fileno(), sys_admin, most_descriptors(),
                              source=f"/proc/self/fd/{directory}/.",
                              coherent=is_volume_tag(tag))
        with open(virtiofsd_log(tag), "wb") as log_file:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=log_file, pass_fds=(listener.fileno(), directory),
                                    preexec_fn=unblock_all_signals)
        connected = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connected.connect(path)             # in virtiofsd's backlog: no wait
        except OSError:
            connected.close()
            proc.kill()                         # not plugged: nothing of the guest's on it
            proc.wait()
            raise
        return proc, connected
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def virtiofsd_log(tag):
    return os.path.join(paths.RUN_DIR, f"virtiofsd-{tag}.log")


def stop(proc, wait=STOP_WAIT):
    """virtiofsd leaves at its socket's EOF (chardev-remove); one that does not is
    killed."""
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def best_effort(qmp, command, **arguments):
    try:
        qmp.execute(command, **arguments)
    except Exception:
        pass


class MemberExports:
    """`monitor`: a container.shared_monitor.SharedMonitor (connect() -> a QMP client
    for one change, given back at close); `serve`: start_virtiofsd, or a test's;
    `sys_admin`: virtiofsd keeps CAP_SYS_ADMIN (the sandbox's DKVM_SYS_ADMIN)."""

    def __init__(self, monitor, serve=start_virtiofsd, sys_admin=False):
        self.monitor = monitor
        self.serve, self.sys_admin = serve, sys_admin
        self.jobs = queue.Queue()
        self.inbox, self.outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.inbox.setblocking(False)
        self.thread = None
        self.served = {}                # tag -> (virtiofsd, the member's mount namespace)
        self.stuck = []                 # those whose unplug failed: kept to the end

    def plug(self, channel, tag, export):
        """Serve and plug the export `export` (its directory's and its mount
        namespace's descriptors: ours from now, closed once done with); the outcome
        comes out of `inbox` (outcomes())."""
        self.submit((channel, tag, export))

    def unplug(self, tag):
        self.submit((None, tag, None))

    def most_descriptors_open(self):
        """The most descriptors any member's virtiofsd has open (the supervisor asks
        the guest to let go of inodes for every export at once)."""
        return max((descriptors_open(proc.pid) for proc, _ in list(self.served.values())),
                   default=0)

    def submit(self, job):
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="member-exports", daemon=True)
            self.thread.start()
        self.jobs.put(job)

    def outcomes(self):
        """(channel, tag, error) for each plug done since the last call; error "" when
        the export is plugged."""
        done = []
        while True:
            try:
                data = self.inbox.recv(MOST_ERROR * 4 + 64)
            except BlockingIOError:
                return done
            channel, tag, error = data.decode(errors="replace").split(" ", 2)
            done.append((int(channel), tag, error))

    def run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            channel, tag, export = job
            if channel is None:
                self.remove(tag)
            else:
                error = self.add(tag, *export)
                self.outbox.send(f"{channel} {tag} {error}".encode())

    def add(self, tag, directory, namespace):
        proc = None
        try:
            proc, connected = self.serve(directory, tag, self.sys_admin)
            try:
                qmp = self.monitor.connect()
                try:
                    plug(qmp, connected.fileno(), tag)
                finally:
                    qmp.close()
            finally:
                connected.close()               # QEMU holds the one end left
            self.served[tag] = (proc, namespace)
            return ""
        except DeviceUnknown as err:
            self.stuck.append((proc, namespace))
            return err.message
        except Exception as err:
            if proc is not None:
                proc.kill()
                proc.wait()
            os.close(namespace)
            return log.printable(str(err) or type(err).__name__)[:MOST_ERROR]
        finally:
            os.close(directory)                 # virtiofsd has its own

    def remove(self, tag):
        """Unplugged, its virtiofsd ends; one still plugged keeps its virtiofsd (and the
        member's mounts) until the VM ends: the guest may still use it."""
        if tag not in self.served:
            return
        proc, namespace = self.served.pop(tag)
        try:
            qmp = self.monitor.connect()
            try:
                unplug(qmp, tag)
            finally:
                qmp.close()
        except Exception as err:
            log.warn(f"cannot unplug a pod member's export ({tag}) from the VM: {err}")
            self.stuck.append((proc, namespace))
            return
        stop(proc)
        os.close(namespace)
        try:
            os.unlink(virtiofsd_log(tag))
        except OSError:
            pass

    def close(self):
        """Finish the job under way (bounded) and stop: for tests; the entrypoint's
        end takes the thread with it."""
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join(STOP_WAIT)
        self.inbox.close()
        self.outbox.close()


def sandbox_exports(plan, monitor):
    """A pod's sandbox's MemberExports (its virtiofsds keep CAP_SYS_ADMIN as the
    sandbox's own does, with DKVM_SYS_ADMIN); None for any other container."""
    if plan.pod != POD_SANDBOX:
        return None
    return MemberExports(monitor, sys_admin=plan.options.sys_admin)
