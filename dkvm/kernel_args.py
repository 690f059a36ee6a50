"""The guest kernel's command line: DKVM's own arguments, and the user's
DKVM_KERNEL_APPEND, which may add to them and take some away.

Shared: the runtime checks a DKVM_KERNEL_APPEND at create, the container side
composes the line at boot. Plain string work, no imports.
"""

# i8042 probing costs 0.6 s under TCG and the guest has no PS/2 devices. ACPI's
# interrupt links cost 0.35 s (AML run for each PCI device) where the BIOS's PCI
# routing table does the same for devices that use MSI-X anyway; ACPI stays on for
# the rest (NIC hot-plug, power-off).
# rcu_expedited: the guest's init renames its NICs and brings them up, each waiting
# for an RCU grace period, some 15 ms under TCG, and so do namespaces and mounts.
# no_timer_check: on a loaded host the vCPU can miss the ticks the kernel's IO-APIC
# timer check counts, and the kernel panics ("IO-APIC + timer doesn't work"): 8 of
# 300 soak boots without it and tsc=reliable (4 VMs on 2 cores, TCG), 1 of 300
# without it alone, none of 300 without tsc=reliable alone.
BASE = ["panic=-1", "i8042.noaux", "i8042.nokbd", "i8042.nopnp", "i8042.dumbkbd",
        "tsc=reliable", "no_timer_check", "random.trust_cpu=on", "acpi=noirq",
        "rcupdate.rcu_expedited=1"]
# The kernel console is a serial port: with DKVM_KERNEL_DEBUG, the whole boot log on
# the container's stderr; otherwise only errors, into a file the container side
# quotes when the VM fails.
QUIET = ["console=ttyS0", "quiet"]
DEBUG = ["console=ttyS0", "loglevel=7"]
# What a `-name` in DKVM_KERNEL_APPEND may take away: the tuning above, not what
# the boot needs (root=, init=) or the console DKVM reads errors from.
REMOVABLE = BASE + ["quiet", "loglevel=7"]
# x86's COMMAND_LINE_SIZE is 2048 bytes with the terminating NUL; a longer line is cut,
# and what DKVM puts last (init's arguments after `--`) would be lost. DKVM's own line
# is at most 337 characters (direct boot, DKVM_KERNEL_DEBUG); MAX_APPEND leaves it
# room to grow (tests/unit/test_options_property.py checks the sum).
COMMAND_LINE_MAX = 2047
MAX_APPEND = 1536
# The kernel's own undotted parameters a DKVM_KERNEL_APPEND may add, each in Linux
# 6.1's Documentation/admin-guide/kernel-parameters.txt or its __setup() list
# (`-` and `_` are the same to the kernel; written here with `_`). Any other undotted
# name would reach DKVM's init as an argument or an environment variable.
KERNEL_PARAMETERS = frozenset("""
    acpi acpi_enforce_resources amd_iommu apparmor audit cgroup_disable cgroup_no_v1
    clocksource cma console_msg_format crashkernel debug default_hugepagesz delayacct
    earlyprintk efi elevator ftrace gather_data_sampling hardened_usercopy
    hardlockup_all_cpu_backtrace hugepages hugepagesz hung_task_panic idle ignore_loglevel
    init_on_alloc init_on_free initcall_blacklist initcall_debug intel_iommu iommu irqaffinity
    irqpoll isolcpus kasan kasan_multi_shot kernelcore kmemleak l1tf lockdown log_buf_len
    loglevel lsm maxcpus mce mds mem memblock memtest mitigations mmio_stale_data
    module_blacklist movable_node movablecore nmi_watchdog no_timer_check noapic noefi
    noexec nofxsr nohugeiomap nohugevmalloc nohz nohz_full noirqdebug nokaslr nolapic nopku
    nopti noreplace_smp norandmaps nosmap nosmep nosmp nosoftlockup nospec_store_bypass_disable
    nospectre_v1 nospectre_v2 nowatchdog noxsave nr_cpus nr_uarts numa numa_balancing oops
    page_poison panic panic_on_warn panic_print pci pcie_aspm preempt psi pti quiet
    randomize_kstack_offset rcu_nocbs reboot retbleed rodata security selinux slab_nomerge
    slub_debug slub_max_order slub_min_objects softlockup_panic spec_store_bypass_disable
    spectre_v2 spectre_v2_user split_lock_detect srbds stack_guard_gap swapaccount swiotlb
    sysrq_always_enabled threadirqs trace_buf_size trace_event transparent_hugepage tsc tsx
    unknown_nmi_panic vdso vsyscall watchdog_thresh
""".split())
# Parameters the kernel knows that choose the guest's root, its init or the console
# DKVM reads its errors from: DKVM's, never added.
BOOT_PARAMETERS = frozenset("""
    init rdinit root rootfstype rootflags rootwait rootdelay ro rw initrd noinitrd console
    nfsroot nfsrootdebug ip resume noresume
""".split())
# sysctl.<name>=<value> sets a sysctl at boot, and some name programs the kernel runs
# as root (kernel.core_pattern, kernel.modprobe): no module parameter's name starts so.
SYSCTL_PREFIX = "sysctl."
NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def argument_name(argument):
    return argument.partition("=")[0]


def split_user_append(text):
    """(arguments to add, arguments to remove) from DKVM_KERNEL_APPEND's text: a word
    `-name` or `-name=value` takes DKVM's argument of that name (or exactly that
    argument) away."""
    add, remove = [], []
    for word in text.split():
        if word.startswith("-") and len(word) > 1 and word != "--":
            remove.append(word[1:])
        else:
            add.append(word)
    return add, remove


def removes(removal, argument):
    return removal == argument or removal == argument_name(argument)


def unknown_removals(text):
    """The removals in DKVM_KERNEL_APPEND that name none of DKVM's removable
    arguments: a typo would otherwise leave the argument in place unnoticed."""
    _, remove = split_user_append(text)
    return [r for r in remove if not any(removes(r, argument) for argument in REMOVABLE)]


def compose(boot_arguments, kernel_debug, user_append):
    """DKVM's arguments, the kernel's own (`boot_arguments`: its root, its init), the
    console, then the user's, less what the user took away."""
    add, remove = split_user_append(user_append)
    parts = BASE + boot_arguments + (DEBUG if kernel_debug else QUIET)
    parts = [p for p in parts if not (p in REMOVABLE and any(removes(r, p) for r in remove))]
    return parts + [word for word in add if not refusal(word)]


def refusal(word):
    """Why a word DKVM_KERNEL_APPEND adds is not accepted (None when it is): the kernel
    hands init, as an argument or (`name=value`) in its environment, every word it does
    not know whose name has no dot, and all that follows `--`. So a word names a module
    parameter (`module.param=value`) or one of the kernel's own (KERNEL_PARAMETERS)."""
    name = argument_name(word)
    if word == "--":
        return "the kernel hands what follows it to init"
    if '"' in word:
        return "the kernel reads quotes itself"
    if name.replace("-", "_") in BOOT_PARAMETERS:
        return "it chooses how the guest boots, which is DKVM's"
    if "." in name:
        if not all(part and set(part) <= NAME_CHARACTERS for part in name.split(".")):
            return "it is not a kernel parameter"
        if name.startswith(SYSCTL_PREFIX):
            return "the guest's sysctls at boot can name programs the kernel runs as root"
        return None
    if name.replace("-", "_") not in KERNEL_PARAMETERS:
        return "the kernel would hand it to init"
    return None
