"""`--device` in a VM: the workload gets a node with the same number in the guest,
which is only worth having where the guest kernel drives that device. The host's
device itself never reaches the VM, so a device the guest has no driver for is
refused at create, with the list of what it has."""
from dkvm.errors import DkvmError
from dkvm.schema import Device

ANY = None
# (type, major, minor) -> what it is: what every guest kernel DKVM boots drives,
# built in or from a module it loads when the node is opened
GUEST_DEVICES = {("c", 1, 3): "null", ("c", 1, 5): "zero", ("c", 1, 7): "full",
                 ("c", 1, 8): "random", ("c", 1, 9): "urandom", ("c", 1, 11): "kmsg",
                 ("c", 5, 0): "tty", ("c", 5, 2): "ptmx", ("c", 10, 229): "fuse",
                 ("c", 10, 200): "net/tun", ("c", 10, 237): "loop-control",
                 ("b", 7, ANY): "loop*"}
FULL_ACCESS = set("rwm")


def guest_devices(linux):
    """The config's devices as the guest makes them; a DkvmError for one the guest
    kernel cannot drive, or whose access the VM cannot restrict (in its own kernel
    the workload is root over every device: only `rwm` means the same there)."""
    rules = (linux.get("resources") or {}).get("devices") or []
    if granted_access(rules, ("c", -2, -2)) == FULL_ACCESS:
        return []       # `--privileged`: in the VM, every device of the guest's kernel
    devices = []
    for dev in linux.get("devices") or []:
        path, kind = dev.get("path", ""), dev.get("type", "c")
        number = (kind, dev.get("major", 0), dev.get("minor", 0))
        if number not in GUEST_DEVICES and number[:2] + (ANY,) not in GUEST_DEVICES:
            raise DkvmError(f"--device {path}: the VM's kernel has no driver for {kind} "
                            f"{number[1]}:{number[2]}; the VM has /dev/"
                            + ", /dev/".join(sorted(GUEST_DEVICES.values())))
        access = granted_access(rules, number)
        if access != FULL_ACCESS:
            raise DkvmError(f"--device {path}:{''.join(sorted(access)) or '-'}: the VM cannot "
                            "restrict a device's access, use rwm (the default)")
        devices.append(Device(path=path, type=kind, major=number[1], minor=number[2],
                              file_mode=dev.get("fileMode", 0o666) & 0o7777,
                              uid=dev.get("uid", 0), gid=dev.get("gid", 0)))
    return devices


def granted_access(rules, number):
    """What the config's device cgroup rules leave allowed for `number`, in order
    (a deny rule takes back what it names, as the device controller applies them)."""
    access = set()
    for rule in rules:
        kind, major, minor = rule.get("type") or "a", rule.get("major"), rule.get("minor")
        if kind not in ("a", number[0]) or major not in (None, -1, number[1]) or \
                minor not in (None, -1, number[2]):
            continue
        letters = set(rule.get("access") or "rwm")
        access = access | letters if rule.get("allow") else access - letters
    return access
