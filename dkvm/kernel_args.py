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


def argument_name(argument):
    return argument.partition("=")[0]


def split_user_append(text):
    """(arguments to add, arguments to remove) from DKVM_KERNEL_APPEND's text: a word
    `-name` or `-name=value` takes DKVM's argument of that name (or exactly that
    argument) away; a lone `--` and what follows are the user's, passed on."""
    words = text.split()
    add, remove = [], []
    for index, word in enumerate(words):
        if word == "--":
            add += words[index:]
            break
        if word.startswith("-") and len(word) > 1:
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
    return parts + add
