"""VM templates: a VM booted once and saved, restored into each container's VM.

A template is DKVM's init with its Python and guest modules loaded, waiting for a plan
(the kernel booted with the template's initramfs beside it: paths.TEMPLATE_INITRD), saved with
its RAM in a file and its devices' state in another (QEMU's x-ignore-shared migration,
`-incoming` at restore: container.restore). It is made by the host alone (the runtime
at create, or `dkvm install`), from the payload's files alone, in the payload's
directory (paths.TEMPLATES_DIR: a container sees it read-only, and it goes with its
build); no container side writes what other VMs restore.

One template per machine: the kernel, the accelerator, the vCPUs and the guest RAM
(the payload's build is the directory it is in). A container whose VM needs one that
is not there boots cold, and its create makes it for the next (the first of
concurrent creates; the others boot cold too). At most MOST_TEMPLATES per build: the
least recently used go. A template whose files are not what its manifest says is
removed and made again."""
import os
import stat
import time

from dkvm import lightjson, paths, wire
from dkvm.boot.machine import MANIFEST, RAM, STATE
from dkvm.errors import DkvmError

MOST_TEMPLATES = 8          # per build; each is a sparse RAM file (~70 MiB of data) + ~400 KB
MOST_MANIFEST = 64 << 10
BOOT_WAIT = 40              # s: the template's VM booting to its plan request (TCG, loaded host)
# s: after a template could not be made, creates boot cold this long before one tries
# again (each try costs a create up to BOOT_WAIT)
RETRY_AFTER = 600
SAVE_WAIT = 60              # s: QEMU saving the device state
# s: the guest's free page reporting settling (it reports 2 s after a free): the RAM
# file no smaller for SETTLE_QUIET, or SETTLE_MOST in all
SETTLE_QUIET, SETTLE_MOST = 2.5, 8
QEMU_EXIT_WAIT = 10
MAKER_LOG_END = 4096        # bytes of each of a failed making's logs kept in its mark
LOCK = ".lock"


class TemplateSpec:
    """The machine a template is for, and its directory's name."""

    def __init__(self, kernel, accel, vcpus, memory_mib):
        self.kernel, self.accel, self.vcpus, self.memory_mib = kernel, accel, vcpus, memory_mib

    @property
    def name(self):
        return f"{self.kernel}-{self.accel}-{self.vcpus}cpu-{self.memory_mib}m"

    def as_dict(self):
        return {"kernel": self.kernel, "accel": self.accel, "vcpus": self.vcpus,
                "memory_mib": self.memory_mib}


def spec_for(plan, vcpus):
    """The template `plan`'s VM restores from, or None when it boots cold: templates
    off (DKVM_TEMPLATE=0), the image's kernel (not DKVM's files), or arguments of the
    user's or DKVM_KERNEL_DEBUG (the template's command line is DKVM's alone)."""
    options = plan.options
    if not options.template or plan.boot.from_image or options.kernel_append \
            or options.kernel_debug:
        return None
    return TemplateSpec(plan.boot.name, options.accel, vcpus, plan.memory_mib)


def make_default_template(payload_dir):
    """`dkvm install`: the template of `docker run` with no option: the default kernel
    and accelerator, every CPU, no memory limit. What it did, for the operator."""
    from dkvm.host.facts import kvm_usable
    from dkvm.host.payload import payload_kernels
    from dkvm.host.rewrite import choose_accel
    from dkvm.host.vm_size import plan_memory
    from dkvm.options import BY_ENV
    boot = payload_kernels(payload_dir)[BY_ENV["DKVM_KERNEL"].default]
    accel = choose_accel(BY_ENV["DKVM_ACCEL"].default, kvm_usable())
    spec = TemplateSpec(boot.name, accel, len(os.sched_getaffinity(0)),
                        plan_memory({}, accel)[0])
    started = time.monotonic()
    if not make_template(payload_dir, spec, boot):
        return f"the default VM template ({spec.name}) could not be made: VMs boot cold " \
            "until a container's create makes it"
    return f"default VM template {spec.name} ready ({time.monotonic() - started:.1f} s)"


def templates_dir(payload_dir):
    return os.path.join(payload_dir, paths.TEMPLATES_DIR)


def template_for_create(plan, config, payload_dir):
    """The runtime at create: the name of a sound template for `plan`'s VM, or "" (it
    boots cold), having made the template then for the containers to come."""
    spec = spec_for(plan, expected_vcpus(plan, config))
    if spec is None:
        return ""
    directory = os.path.join(templates_dir(payload_dir), spec.name)
    if sound(directory, spec):
        os.utime(os.path.join(directory, MANIFEST))     # recently used
        return spec.name
    make_template(payload_dir, spec, plan.boot)
    return ""


def expected_vcpus(plan, config):
    """The vCPUs the container side will give the VM (container.processes.vm_vcpus):
    the plan's, or as many as the container may use: its cpuset's, or ours. Where the
    container side finds otherwise, the template does not fit and the VM boots cold."""
    if plan.cpus:
        return plan.cpus
    cpuset = (((config.get("linux") or {}).get("resources") or {}).get("cpu") or {}).get("cpus")
    return len(cpu_list(cpuset)) if cpuset else len(os.sched_getaffinity(0))


def cpu_list(text):
    """`0-2,5` -> {0, 1, 2, 5}; an unreadable list counts as empty (cold boot)."""
    cpus = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        return set()
    return cpus


def sound(directory, spec):
    """Whether `directory` holds the template `spec` names, as this host made it: root's
    own directory and regular files, not links, of the sizes the manifest records, the
    state the one its hash records."""
    try:
        manifest = read_manifest(directory)
        if {key: manifest.get(key) for key in spec.as_dict()} != spec.as_dict():
            return False
        ram = os.lstat(os.path.join(directory, RAM))
        state = os.lstat(os.path.join(directory, STATE))
    except (OSError, ValueError):
        return False
    if not (all(stat.S_ISREG(info.st_mode) and info.st_uid == 0 for info in (ram, state))
            and ram.st_size == spec.memory_mib << 20
            and state.st_size == manifest.get("state_size")):
        return False
    try:
        return state_sha256(directory) == manifest.get("state_sha256")
    except OSError:
        return False


def state_sha256(directory):
    """The state's hash: a state damaged in place keeps its size, and every container
    side would refuse it (container.restore) and boot cold until it is made again.
    About 400 KB: a millisecond at each create."""
    from dkvm.boot.machine import state_digest
    fd = os.open(os.path.join(directory, STATE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return state_digest(os.read(fd, os.fstat(fd).st_size + 1))
    finally:
        os.close(fd)


def read_manifest(directory):
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
        raise ValueError(f"{directory} is not root's directory")
    fd = os.open(os.path.join(directory, MANIFEST), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != 0 or info.st_size > MOST_MANIFEST:
            raise ValueError("not root's manifest")
        manifest = lightjson.loads(os.read(fd, MOST_MANIFEST).decode())
    finally:
        os.close(fd)
    if not isinstance(manifest, dict):
        raise ValueError("a manifest is an object")
    return manifest


def make_template(payload_dir, spec, boot):
    """Make the template `spec` names unless another process is making it (that one's
    containers and this one boot cold meanwhile). A template that is not sound is
    replaced. Failing is not the container's failure: it boots cold."""
    import fcntl
    import shutil
    import subprocess
    top = templates_dir(payload_dir)
    os.makedirs(top, mode=0o755, exist_ok=True)
    with open(os.path.join(top, LOCK), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        target = os.path.join(top, spec.name)
        if sound(target, spec):
            return True
        failed = os.path.join(top, f".failed-{spec.name}")
        if os.path.exists(failed) and time.time() - os.stat(failed).st_mtime < RETRY_AFTER:
            return False
        remove_stale(top)
        import tempfile
        work = tempfile.mkdtemp(prefix=".making-", dir=top)
        try:
            save_template(payload_dir, spec, host_path(payload_dir, boot.kernel), boot.append,
                          work)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.unlink(target)       # a link (never followed) or a file in its place
            os.rename(work, target)
        except (OSError, DkvmError, ValueError, subprocess.TimeoutExpired) as err:
            with open(failed, "w") as f:
                f.write(f"{err}\n{logs_end(work)}")        # why, for whoever looks
            return False
        finally:
            shutil.rmtree(work, ignore_errors=True)
        prune_templates(top, keep=spec.name)
    return True


def host_path(payload_dir, path):
    """A payload file the container sees at `path` (under paths.PAYLOAD_MOUNT)."""
    return os.path.join(payload_dir, os.path.relpath(path, paths.PAYLOAD_MOUNT))


def save_template(payload_dir, spec, kernel, append, work):
    """Boot the template's VM in `work` until its init asks for a plan, save it there
    (RAM, STATE, MANIFEST), and stop it."""
    from dkvm.boot.machine import IGNORE_SHARED, state_digest
    from dkvm.boot.qmp import Qmp
    import socket
    import subprocess
    ram = os.path.join(work, RAM)
    with open(ram, "wb") as f:
        f.truncate(spec.memory_mib << 20)
    control_path, qmp_path = os.path.join(work, "control.sock"), os.path.join(work, "qmp.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(control_path)
    listener.listen(1)
    argv = maker_argv(payload_dir, spec, kernel, append, work)
    env = {"QEMU_MODULE_DIR": paths.payload_path("qemu", "modules", root=payload_dir)}
    with open(os.path.join(work, "qemu.log"), "wb") as log:
        qemu = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, preexec_fn=die_with_parent)
    control = None
    try:
        control = wait_for_plan_request(listener, qemu)
        settle_free_pages(ram)
        if qemu.poll() is not None:
            raise DkvmError(f"the template's QEMU exited (status {qemu.returncode}) after its "
                            f"VM asked for a plan")
        qmp = Qmp(qmp_path)
        qmp.execute("stop")
        qmp.execute("migrate-set-capabilities", capabilities=IGNORE_SHARED)
        with open(os.path.join(work, STATE), "wb") as state:
            qmp.execute("getfd", fd=state.fileno(), fdname="state")
        qmp.execute("migrate", uri="fd:state")
        wait_for_save(qmp, qemu)
        qmp.execute("quit")
        qmp.close()
        qemu.wait(QEMU_EXIT_WAIT)
    finally:
        listener.close()
        if control is not None:
            control.close()
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    from dkvm.boot.sparse import punch_zero_pages
    with open(ram, "rb+") as f:
        punch_zero_pages(f.fileno())
        os.fsync(f.fileno())
    with open(os.path.join(work, STATE), "rb") as f:
        state = f.read()
    manifest = dict(spec.as_dict(), state_size=len(state),
                    state_sha256=state_digest(state), made=int(time.time()))
    with open(os.path.join(work, MANIFEST), "w") as f:
        f.write(lightjson.dumps(manifest))
        os.fsync(f.fileno())
    for name in os.listdir(work):
        if name not in (RAM, STATE, MANIFEST):      # the sockets, QEMU's and the console's logs
            os.unlink(os.path.join(work, name))
        else:
            os.chmod(os.path.join(work, name), 0o644)
    os.chmod(work, 0o755)


def maker_argv(payload_dir, spec, kernel, append, work):
    """The template's QEMU: the machine every restore of it runs (boot.machine), its RAM
    the file `work`/RAM, its control port on `work`/control.sock, the other ports
    nowhere."""
    from dkvm.boot.machine import machine_argv, template_boot_argv, template_devices
    argv = machine_argv(spec.memory_mib, spec.vcpus, spec.accel, 0,
                        f"memory-backend-file,mem-path={os.path.join(work, RAM)}",
                        root=payload_dir)
    argv += template_boot_argv(kernel, append) + template_devices()
    return argv + [
        "-chardev", f"socket,id=ctl,path={os.path.join(work, 'control.sock')}",
        *[arg for name in ("con", "out", "err", "in") for arg in ("-chardev", f"null,id={name}")],
        "-chardev", f"file,id=console,path={os.path.join(work, 'console.log')}",
        "-qmp", f"unix:{os.path.join(work, 'qmp.sock')},server=on,wait=off"]


def wait_for_plan_request(listener, qemu):
    """Until the template's init sends INIT: it is then blocked reading its plan. The
    connection, open until the VM is saved: were it closed, the guest's read of its
    port would end, and init with it."""
    deadline = time.monotonic() + BOOT_WAIT
    listener.settimeout(BOOT_WAIT)
    conn, _ = listener.accept()
    decoder = wire.Decoder()
    try:
        while time.monotonic() < deadline:
            if qemu.poll() is not None:
                raise DkvmError("the template's QEMU exited while booting")
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            data = conn.recv(65536)
            if not data:
                raise DkvmError("the template's VM closed its control port")
            if any(frame.type == wire.INIT for frame in decoder.feed(data)):
                return conn
    except BaseException:
        conn.close()
        raise
    conn.close()
    raise DkvmError(f"the template's VM did not boot in {BOOT_WAIT}s")


def settle_free_pages(ram):
    """Until the guest has reported the memory it freed while booting (the initramfs's
    archive, mostly: free page reporting, 2 s after a free) and QEMU has punched it
    out of the RAM file: every VM restored from the template copies less. Bounded."""
    deadline = time.monotonic() + SETTLE_MOST
    blocks, still_since = os.stat(ram).st_blocks, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - still_since < SETTLE_QUIET:
        time.sleep(0.1)
        now = os.stat(ram).st_blocks
        if now < blocks:
            blocks, still_since = now, time.monotonic()


def wait_for_save(qmp, qemu):
    deadline = time.monotonic() + SAVE_WAIT
    while time.monotonic() < deadline:
        status = qmp.execute("query-migrate").get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled") or qemu.poll() is not None:
            raise DkvmError(f"saving the template failed ({status})")
        time.sleep(0.02)
    raise DkvmError(f"saving the template took over {SAVE_WAIT}s")


def logs_end(work, most=MAKER_LOG_END):
    """The end of the template VM's console and of QEMU's own messages: a failed
    making's work directory goes, and these say why it failed."""
    ends = []
    for name in ("console.log", "qemu.log"):
        try:
            with open(os.path.join(work, name), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - most))
                ends.append(f"--- {name}\n{f.read().decode(errors='replace')}\n")
        except OSError:
            continue
    return "".join(ends)


def die_with_parent():
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)       # PR_SET_PDEATHSIG, SIGKILL


def remove_stale(top):
    """What a maker killed half-way left (the lock is ours: no maker runs), and the
    marks of failures long past."""
    import shutil
    for name in os.listdir(top):
        path = os.path.join(top, name)
        if name.startswith(".making-"):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".failed-") and time.time() - os.stat(path).st_mtime > RETRY_AFTER:
            os.unlink(path)


def prune_templates(top, keep):
    """All but the MOST_TEMPLATES most recently used (and `keep`)."""
    import shutil
    names = [name for name in os.listdir(top) if not name.startswith(".")]
    names.sort(key=lambda name: last_used(os.path.join(top, name)), reverse=True)
    for name in names[MOST_TEMPLATES:]:
        if name != keep:
            shutil.rmtree(os.path.join(top, name), ignore_errors=True)


def last_used(directory):
    try:
        return os.stat(os.path.join(directory, MANIFEST)).st_mtime
    except OSError:
        return 0


def check_templates():
    """`dkvm doctor`: the current build's templates, and what they take."""
    from dkvm.host.payload import archive_path, build_id
    try:
        payload_dir = paths.host_payload_dir(build_id(archive_path()))
    except (OSError, DkvmError) as err:
        return "warn", f"VM templates: cannot find this build's payload ({err})", ""
    found = list_templates(payload_dir)
    if not found:
        return "warn", "no VM template yet: the first container of each machine boots cold", \
            "dkvm install (makes the default one)"
    total = sum(size for _, size in found) >> 20
    return "ok", f"{len(found)} VM template(s) (at most {MOST_TEMPLATES}), {total} MiB on " \
        f"disk in {templates_dir(payload_dir)}: {', '.join(name for name, _ in found)}", ""


def list_templates(payload_dir):
    """[(name, bytes on disk)] of a build's templates, for `dkvm doctor`."""
    top = templates_dir(payload_dir)
    found = []
    for name in sorted(os.listdir(top)) if os.path.isdir(top) else []:
        if name.startswith("."):
            continue
        directory = os.path.join(top, name)
        size = sum(os.stat(os.path.join(directory, f)).st_blocks * 512
                   for f in os.listdir(directory))
        found.append((name, size))
    return found
