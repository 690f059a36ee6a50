"""Linux's names for capabilities, resource limits and signals, as OCI configs and
runc's command line write them, in the kernel's own numbering (x86_64). The runtime
checks a config's names against these at create; the guest turns them into numbers.

Shared by every side: plain tables, no imports."""

# index = capability number (linux/capability.h)
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
CAPABILITY_NUMBERS = {name: number for number, name in enumerate(CAPABILITIES)}

# index = resource number (asm-generic/resource.h)
RLIMITS = (
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
    "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME",
)
RLIMIT_NUMBERS = {name: number for number, name in enumerate(RLIMITS)}
RLIM_INFINITY = (1 << 64) - 1

# the signals runc's `kill` takes by name (SIGRTMIN is glibc's, 34: the kernel's 32
# and 33 belong to the C library)
SIGNALS = {"HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "IOT": 6,
           "BUS": 7, "FPE": 8, "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13,
           "ALRM": 14, "TERM": 15, "STKFLT": 16, "CHLD": 17, "CONT": 18, "STOP": 19,
           "TSTP": 20, "TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25,
           "VTALRM": 26, "PROF": 27, "WINCH": 28, "IO": 29, "POLL": 29, "PWR": 30,
           "SYS": 31}
SIGRTMIN, SIGRTMAX = 34, 64
SIGKILL, SIGSTOP = 9, 19


def signal_number(text):
    """runc's `kill` argument (`9`, `KILL`, `SIGKILL`, `RTMIN+3`) as a number, or None."""
    text = text.upper()
    if text.isdigit():
        number = int(text)
        return number if 1 <= number <= SIGRTMAX else None
    name = text[3:] if text.startswith("SIG") else text
    if name in SIGNALS:
        return SIGNALS[name]
    for base, sign, start in (("RTMIN", 1, SIGRTMIN), ("RTMAX", -1, SIGRTMAX)):
        if name == base:
            return start
        if name.startswith(base + ("+" if sign > 0 else "-")) and name[6:].isdigit():
            number = start + sign * int(name[6:])
            return number if SIGRTMIN <= number <= SIGRTMAX else None
    return None


def handles_signal(status, signum):
    """Whether a process's /proc/PID/status (bytes) shows `signum` blocked, caught or
    ignored: whether a signal sent now is not lost (to a PID 1) or taken by its
    default action."""
    for line in status.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"SigBlk", b"SigCgt", b"SigIgn") and int(value.strip(), 16) >> (signum - 1) & 1:
            return True
    return False
