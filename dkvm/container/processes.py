"""The VM's processes on the container side, virtiofsd and QEMU: started from the
payload, watched, described when they die, stopped at the end."""
import os
import stat
import subprocess

from dkvm import paths
from dkvm.log import printable
from dkvm.container.signal_inbox import unblock_all_signals
from dkvm.container.vmm import qemu_argv, qemu_env, restore_argv, virtiofsd_argv
from dkvm.errors import DkvmError

LOG_TAIL = 400              # characters of a log quoted in an error
QEMU_END_GRACE = 1          # s: QEMU exiting after virtiofsd saw its socket close
SYS_PIDFD_OPEN, SYS_PROCESS_MADVISE = 434, 440      # x86_64
MADV_PAGEOUT = 21
NR_OPEN_DEFAULT = 1 << 20   # the kernel's fs.nr_open: no RLIMIT_NOFILE goes above it


class Child:
    def __init__(self, name, proc, log):
        self.name, self.proc, self.log = name, proc, log

    def exited(self):
        return self.proc.poll() is not None

    def describe_exit(self):
        """` (QEMU killed by signal 9: <its log's tail>)`, or "" while it runs."""
        code = self.proc.poll()
        if code is None:
            return ""
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        text = tail(self.log)
        return f" ({self.name} {how}{': ' + text if text else ''})"


class VmProcesses:
    def __init__(self):
        self.virtiofsd = self.qemu = None
        self.kernel_released = False

    def children(self):
        return [child for child in (self.virtiofsd, self.qemu) if child]

    def start_virtiofsd(self, listener, plan):
        """virtiofsd on the socket QEMU will connect to, already listening: both start
        at once."""
        log = open(paths.VIRTIOFSD_LOG, "wb")
        fd = listener.fileno()
        proc = subprocess.Popen(virtiofsd_argv(fd, plan.options.sys_admin, most_descriptors()),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(fd,), preexec_fn=unblock_all_signals)
        listener.close()
        self.virtiofsd = Child("virtiofsd", proc, paths.VIRTIOFSD_LOG)

    def start_qemu(self, plan, disk_fds=(), boot_fds=(), template=None):
        """QEMU gets the container's stdio as extra fds for the stdio ports, the
        disks' open files and the files it boots that are not the payload's (named in
        the plan's boot descriptor), or, restoring from a template
        (restore.TemplateFiles), the VM's RAM and the template's state (kept open: the
        RAM is filled while QEMU starts, restore.Resumption); its own fd 2
        goes to a log so that its warnings never mix with the workload's output."""
        out_fd, err_fd = dup_or_null(1), dup_or_null(2)
        vcpus = vm_vcpus(plan)
        if template:                    # the payload's kernel: no boot files
            argv = restore_argv(plan, vcpus, out_fd, err_fd, template.ram_fd, disk_fds)
            boot_fds = ()
        else:
            argv = qemu_argv(plan, vcpus, out_fd, err_fd, disk_fds)
        inherited = [fd for pair in disk_fds for fd in pair] + list(boot_fds)
        log = open(paths.QEMU_LOG, "wb")
        stdio = {} if plan.process.terminal else {"stdin": subprocess.DEVNULL, "stdout": log}
        proc = subprocess.Popen(argv, env=dict(os.environ, **qemu_env()), stderr=log,
                                pass_fds=(out_fd, err_fd, *inherited,
                                          *(template.fds() if template else ())),
                                preexec_fn=start_qemu_child,
                                **stdio)
        for fd in (out_fd, err_fd, *inherited):
            os.close(fd)
        self.qemu = Child("QEMU", proc, paths.QEMU_LOG)

    def release_kernel_image(self, boot):
        """QEMU keeps the kernel's ELF mapped for a reset that -no-reboot never makes:
        once the guest runs its copy, those pages leave QEMU (its PSS drops by the
        kernel's size). Best effort: a host without process_madvise keeps them. Once:
        a guest asking for its plan again gets no more work done here."""
        if self.qemu is None or self.kernel_released:
            return
        self.kernel_released = True
        if boot.from_image:             # a bzImage is read, not mapped; its initramfs
            remove_quietly(paths.IMAGE_INITRD)  # in /run (memory) is QEMU's already
            return
        try:
            kernel = os.stat(boot.kernel)
            with open(f"/proc/{self.qemu.proc.pid}/maps") as f:
                ranges = file_mappings(f.read(), kernel.st_dev, kernel.st_ino)
            page_out(self.qemu.proc.pid, ranges)
        except OSError:
            pass

    # --- what the supervisor asks
    def virtiofsd_descriptors(self):
        """(descriptors virtiofsd has open, the most it may), (0, 0) when unknown."""
        if self.virtiofsd is None or self.virtiofsd.exited():
            return 0, 0
        return descriptors_open(self.virtiofsd.proc.pid), most_descriptors()

    def check(self, helpers_only=False):
        """Raise if a child died while it was needed (with `helpers_only`, virtiofsd:
        the VM cannot go on without it; QEMU's own end is the caller's to judge).
        virtiofsd also leaves, with status 0, when QEMU closes its socket on the way
        out (a guest panic), and can be gone while QEMU is still exiting: QEMU then
        gets a moment to end, and if it does, the story is QEMU's, with the guest
        console's. A helper killed or failing is its own story, whatever QEMU does
        next."""
        for child in self.children():
            if not child.exited() or helpers_only and child is self.qemu:
                continue
            if child is not self.qemu and self.left_after_qemu(child):
                if helpers_only:
                    return
                child = self.qemu
            raise DkvmError(f"{child.name} exited unexpectedly{child.describe_exit()}"
                            + (console_tail() if child is self.qemu else ""))

    def left_after_qemu(self, helper):
        return helper.proc.returncode == 0 and self.qemu is not None \
            and self.qemu_ends_within(QEMU_END_GRACE)

    def qemu_ends_within(self, timeout):
        try:
            self.qemu.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def ended(self):
        return self.qemu.exited()

    def wait(self, timeout):
        try:
            self.qemu.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def exit_reason(self):
        """Why the VM stopped, for an error: how each child ended (with its log's
        tail), the guest console."""
        children = [child for child in (self.qemu, self.virtiofsd) if child]
        return "".join(child.describe_exit() for child in children) + console_tail()

    def stop(self, timeout=5):
        for child in reversed(self.children()):
            proc = child.proc
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 28, 47, 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1


def file_mappings(maps, device, inode):
    """(start, length) of each mapping of one file in a /proc/PID/maps text."""
    ranges = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 6 or int(fields[4]) != inode:
            continue
        major, _, minor = fields[3].partition(":")
        if os.makedev(int(major, 16), int(minor, 16)) == device:
            start, _, end = fields[0].partition("-")
            ranges.append((int(start, 16), int(end, 16) - int(start, 16)))
    return ranges


def page_out(pid, ranges):
    """process_madvise(MADV_PAGEOUT) on another process's mappings (CAP_SYS_NICE)."""
    if not ranges:
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_open")
    try:
        vectors = (ctypes.c_size_t * (2 * len(ranges)))(*[n for r in ranges for n in r])
        if libc.syscall(SYS_PROCESS_MADVISE, pidfd, vectors, len(ranges), MADV_PAGEOUT, 0) < 0:
            raise OSError(ctypes.get_errno(), "process_madvise")
    finally:
        os.close(pidfd)


def vm_vcpus(plan):
    """The plan's vCPUs, or as many as the container may use."""
    return plan.cpus or len(os.sched_getaffinity(0))


def descriptors_open(pid):
    """How many descriptors a virtiofsd has open (0 when unknown). The size of its
    descriptor table (in /proc/PID/status) first: the directory of its descriptors is
    listed only once that table is past half the limit."""
    most = most_descriptors()
    try:
        with open(f"/proc/{pid}/status") as f:
            table = next(int(line.split()[1]) for line in f if line.startswith("FDSize:"))
        if table * 2 < most:
            return min(table, most)
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0


def most_descriptors():
    """Our hard RLIMIT_NOFILE: as many descriptors as virtiofsd may have (the guest
    holds one there for each inode it knows)."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return NR_OPEN_DEFAULT if hard == resource.RLIM_INFINITY else hard


def remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def start_qemu_child():
    unblock_all_signals()
    drop_capabilities()


def drop_capabilities():
    """In QEMU's child before exec: root keeps no capability across exec (QEMU needs
    none: /dev/kvm and /dev/net/tun are world-usable, its taps are root's, its sockets
    are in root's /run), and none can come back."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"dropping QEMU's capabilities: {os.strerror(err)}")


def dup_or_null(fd):
    """A copy of one of our stdio fds, or /dev/null where the runtime gave none."""
    try:
        return os.dup(fd)
    except OSError:
        return os.open("/dev/null", os.O_RDWR)


def console_tail():
    text = tail(paths.CONSOLE_LOG)
    return f" (guest console: {text})" if text else ""


def tail(path, limit=LOG_TAIL):
    """A log's last lines, joined into one, its control characters escaped (the guest
    writes the console log and can make QEMU's and virtiofsd's say what it likes).
    Read with a bound, and only if it is a regular file: never through a link, never
    a FIFO (the guest can reach the run directory over virtiofs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return ""
        os.lseek(fd, max(0, info.st_size - 4 * limit), os.SEEK_SET)
        data = os.read(fd, 4 * limit).decode(errors="replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)
    return printable(" | ".join(data.splitlines())[-limit:])
