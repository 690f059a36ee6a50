"""A container's VM restored from its template (host.templates) instead of booted.

The template's RAM is copied into the VM's own memory file (a memfd, as a cold boot's,
charged to the container): virtiofsd needs guest RAM mapped shared, so VMs cannot
share the template's pages copy-on-write. Only the file's data is copied: what the
template never touched stays a hole. QEMU then loads the template's device state
(`-incoming`), the VM runs on from where the template's init asked for a plan, and
its export, NICs and disks are hot-plugged before the plan is sent.

The template's files are the host's (made by the runtime or `dkvm install`, in the
payload directory, read-only here): nothing of the image or the guest is in them.
One that does not match what this container needs, or whose state does not match
its manifest, is not used: the VM boots cold."""
import os
import stat
import time

from dkvm import lightjson, paths
from dkvm.boot.machine import IGNORE_SHARED, MANIFEST, RAM, STATE, state_digest
from dkvm.boot.qmp import TIMEOUT as QMP_TIMEOUT, Qmp
from dkvm.boot.sparse import data_extents
from dkvm.container.vmm import restore_devices
from dkvm.errors import DkvmError

MOST_MANIFEST = 64 << 10
MOST_STATE = 64 << 20        # a device state is about 400 KB
COPY_CHUNK = 64 << 20
RESUME_WAIT = 30             # s: QEMU loading the device state and running the VM
QEMU_END_GRACE = 1           # s: a QEMU whose monitor broke off ending (killed, crashed)


class TemplateFiles:
    """The open files of one template: `ram_fd` (this VM's own memory, which QEMU maps
    as it starts), `state_fd`, and the template's RAM file, copied into `ram_fd` by
    fill_ram while QEMU starts (its RAM is read only when the state is loaded)."""

    def __init__(self, ram_fd, state_fd, ram_source):
        self.ram_fd, self.state_fd, self.ram_source = ram_fd, state_fd, ram_source

    def fds(self):
        return self.ram_fd, self.state_fd

    def fill_ram(self):
        copy_data(self.ram_source, self.ram_fd, os.fstat(self.ram_fd).st_size)

    def close(self):
        for fd in (self.ram_fd, self.state_fd, self.ram_source):
            os.close(fd)


def open_template(plan, vcpus, root=paths.PAYLOAD_MOUNT):
    """The template's files for this VM, or None (the VM boots cold) when the plan
    names none or it does not fit: other vCPUs, RAM or accelerator than the VM's, or
    files that are not what its manifest says."""
    if not plan.template:
        return None
    try:        # one directory, held: a template made again meanwhile is not mixed in
        directory = os.open(paths.payload_path(paths.TEMPLATES_DIR, plan.template, root=root),
                            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        manifest = lightjson.loads(read_regular(MANIFEST, MOST_MANIFEST, directory).decode())
        if (manifest.get("vcpus"), manifest.get("memory_mib"), manifest.get("accel")) != \
                (vcpus, plan.memory_mib, plan.options.accel):
            return None
        state = read_regular(STATE, MOST_STATE, directory)
        if state_digest(state) != manifest.get("state_sha256"):
            return None
        ram_source = open_ram(RAM, plan.memory_mib << 20, directory)
    except (OSError, ValueError, AttributeError):
        return None
    finally:
        os.close(directory)
    return TemplateFiles(sized_memfd(plan.memory_mib << 20), state_memfd(state), ram_source)


def read_regular(path, most, dir_fd=None):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > most:
            raise ValueError(f"{path}: not a regular file of at most {most} bytes")
        return os.read(fd, most + 1)[:most]
    finally:
        os.close(fd)


def state_memfd(state):
    """The state QEMU reads, as checked: a copy, not the file (checked once, read once)."""
    fd = os.memfd_create("dkvm-template-state", 0)
    view = memoryview(state)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def open_ram(path, size, dir_fd=None):
    """The template's RAM file, if it is a regular file of the VM's RAM size."""
    source = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    info = os.fstat(source)
    if not stat.S_ISREG(info.st_mode) or info.st_size != size:
        os.close(source)
        raise ValueError(f"{path}: not a regular file of {size} bytes")
    return source


def sized_memfd(size):
    fd = os.memfd_create("dkvm-guest-ram", 0)
    os.ftruncate(fd, size)
    return fd


def copy_data(source, target, size):
    """The data of `source` into `target` at the same offsets: its holes stay holes."""
    for start, end in data_extents(source, size):
        os.lseek(target, start, os.SEEK_SET)
        while start < end:
            sent = os.sendfile(target, source, start, min(end - start, COPY_CHUNK))
            if sent == 0:
                raise DkvmError("the template's RAM file is shorter than it was")
            start += sent


class Resumption:
    """The template's RAM copied and resume() run in a thread, while QEMU starts and
    the entrypoint takes over the interfaces (a tenth of a second under load): the
    guest probes its hot-plugged devices meanwhile."""

    def __init__(self, plan, template, vm):
        import threading
        self.error = None
        self.thread = threading.Thread(target=self.run, args=(plan, template, vm),
                                       name="resume", daemon=True)
        self.thread.start()

    def run(self, plan, template, vm):
        try:
            template.fill_ram()
            resume(plan, template, vm)
        except BaseException as err:    # the entrypoint's to report: finish()
            self.error = err
        finally:
            template.close()

    def finish(self):
        self.thread.join(RESUME_WAIT + QMP_TIMEOUT)
        if self.thread.is_alive():
            raise DkvmError(f"the VM was not restored from its template in {RESUME_WAIT}s")
        if self.error is not None:
            raise self.error


def resume(plan, template, vm):
    """Have QEMU (started with `-incoming defer`) load the template's device state and
    run the VM, then hot-plug its export, NICs and disks (QMP serves one client: closed
    before the network follower needs it). `vm`: the VmProcesses, checked for QEMU or
    virtiofsd dying meanwhile."""
    try:
        qmp = Qmp(paths.QMP_SOCKET)
        try:
            qmp.execute("migrate-set-capabilities", capabilities=IGNORE_SHARED)
            qmp.execute("migrate-incoming", uri=f"fd:{template.state_fd}")
            plug_devices(qmp, restore_devices(plan), vm.check)
        finally:
            qmp.close()
    except (OSError, DkvmError) as err:  # QEMU's own story first, if it ended (killed)
        vm.qemu_ends_within(QEMU_END_GRACE)
        vm.check()
        raise DkvmError("cannot restore the VM from its template: "
                        f"{getattr(err, 'message', None) or err}") from None


def plug_devices(qmp, devices, check):
    """Once the state is loaded, plug `devices` and run the VM: the template was saved
    stopped, and a restored VM stays so until told (`cont`)."""
    deadline = time.monotonic() + RESUME_WAIT
    while (status := qmp.execute("query-migrate").get("status")) != "completed":
        check()
        if status in ("failed", "cancelled"):
            raise DkvmError(f"QEMU could not restore the VM from its template ({status})")
        if time.monotonic() > deadline:
            raise DkvmError(f"the VM was not restored from its template in {RESUME_WAIT}s")
        time.sleep(0.005)
    for device in devices:
        qmp.execute("device_add", **device)
    qmp.execute("cont")
