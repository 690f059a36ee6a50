"""The few Linux system calls the guest init needs and Python's os module lacks."""
import ctypes
import errno
import fcntl
import os
import _socket
import struct

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_SYNCHRONOUS, MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 16, 1024, 2048, 1 << 21
MS_STRICTATIME = 1 << 24
MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
               "sync": MS_SYNCHRONOUS, "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
               "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
IGNORED_MOUNT_OPTIONS = {"rw", "suid", "dev", "exec", "async", "rprivate", "private",
                         "rslave", "slave", "rshared", "shared", "bind", "rbind", "tmpcopyup"}
MS_REC, MS_PRIVATE, MS_BIND, MS_REMOUNT = 1 << 14, 1 << 18, 4096, 32
MS_UNBINDABLE, MS_SLAVE, MS_SHARED = 1 << 17, 1 << 19, 1 << 20
MS_MOVE = 8192
CLOCK_REALTIME = 0
RNDADDENTROPY, RNDRESEEDCRNG = 0x40085203, 0x5207     # random(4)
PROPAGATIONS = {"shared": MS_SHARED, "slave": MS_SLAVE, "private": MS_PRIVATE,
                "unbindable": MS_UNBINDABLE}
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155        # x86_64
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWCGROUP = 0x00020000, 0x20000000, 0x02000000
CLONE_NEWUSER = 0x10000000
PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 8, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
SYS_CAPSET = 126            # x86_64
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429      # x86_64, Linux 5.2
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD = 1, 4, -100
CAPABILITY_VERSION_3 = 0x20080522
RB_POWER_OFF = 0x4321FEDC
TIOCSCTTY = 0x540E
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def mount(source, target, fstype, flags=0, data=""):
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def clone_mount(path):
    """A detached copy of the mount at `path` (open_tree), to attach elsewhere with
    move_mount, even from a mount namespace where `path` is out of reach; None on a
    kernel without it."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(),
                       OPEN_TREE_CLONE | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            return None
        raise OSError(err, f"open_tree {path}: {os.strerror(err)}")
    return fd


def move_mount(fd, target):
    if _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(),
                     MOVE_MOUNT_F_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"move_mount to {target}: {os.strerror(err)}")


def bind_mount(source, target, readonly=False):
    mount(source, target, "", MS_BIND)
    if readonly:                # a bind mount takes its flags only when remounted
        mount("", target, "", MS_REMOUNT | MS_BIND | MS_RDONLY)


def mount_options(options):
    """OCI mount options -> (flags, data string)."""
    flags, data = 0, []
    for opt in options:
        if opt in MOUNT_FLAGS:
            flags |= MOUNT_FLAGS[opt]
        elif opt not in IGNORED_MOUNT_OPTIONS:
            data.append(opt)
    return flags, ",".join(data)


def unshare(flags):
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def setns(fd, nstype):
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def pivot_to(new_root):
    """Make `new_root` this mount namespace's root, as runc does: the old root is
    stacked on it by pivot_root(".", ".") and detached."""
    mount(new_root, new_root, "", MS_BIND | MS_REC)
    os.chdir(new_root)
    pivot_root(".", ".")
    unmount(".", MNT_DETACH)
    os.chdir("/")


def pivot_root(new_root, put_old):
    if _libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root to {new_root}: {os.strerror(err)}")


def unmount(target, flags=0):
    if _libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmounting {target}: {os.strerror(err)}")


def prctl(option, arg2=0, arg3=0):
    if _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def capset(effective, permitted, inheritable):
    """This process's three capability sets, as bitmasks (two 32-bit words each)."""
    header = struct.pack("Ii", CAPABILITY_VERSION_3, 0)
    data = b"".join(struct.pack("III", (effective >> shift) & 0xFFFFFFFF,
                                (permitted >> shift) & 0xFFFFFFFF,
                                (inheritable >> shift) & 0xFFFFFFFF) for shift in (0, 32))
    if _libc.syscall(SYS_CAPSET, header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def set_rlimit(resource, soft, hard):
    limit = (ctypes.c_uint64 * 2)(soft, hard)
    if _libc.prlimit(0, resource, limit, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setrlimit({resource}, {soft}, {hard}): {os.strerror(err)}")


def make_mounts_private():
    set_root_propagation("rprivate")


def set_root_propagation(kind):
    """`kind` as OCI's rootfsPropagation names it: shared, rslave, private..."""
    recursive = kind.startswith("r") and kind[1:] in PROPAGATIONS
    flags = PROPAGATIONS[kind[1:] if recursive else kind] | (MS_REC if recursive else 0)
    if _libc.mount(b"none", b"/", None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"making / {kind}: {os.strerror(err)}")


def power_off():
    os.sync()
    _libc.reboot(RB_POWER_OFF)
    raise OSError(ctypes.get_errno(), "reboot(POWER_OFF) failed")


def set_uts_names(hostname, domainname):
    """(socket.sethostname would import the socket module, slow under TCG.)"""
    for call, name in ((_libc.sethostname, hostname), (_libc.setdomainname, domainname)):
        raw = name.encode()
        if raw and call(raw, len(raw)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setting host/domain name {name!r}: {os.strerror(err)}")


def set_wall_clock(nanoseconds):
    seconds, rest = divmod(nanoseconds, 1_000_000_000)
    timespec = (ctypes.c_long * 2)(seconds, rest)
    if _libc.clock_settime(CLOCK_REALTIME, timespec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setting the clock: {os.strerror(err)}")


def add_entropy(seed):
    """Mix `seed` into the kernel's pool, credited, and reseed the generator with it
    now (not at its next scheduled reseed): random(4)'s RNDADDENTROPY, RNDRESEEDCRNG."""
    info = struct.pack("ii", len(seed) * 8, len(seed)) + seed
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def write_sysctls(values):
    """{"net.ipv6.conf.lo.disable_ipv6": "0", ...} as `sysctl -w` would set them."""
    for name, value in values.items():
        with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
            f.write(value)


def interface_up(name):
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        ifr = struct.pack("16sH", name.encode(), 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, ifr)[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", name.encode(), flags | IFF_UP))
    finally:
        s.close()

