"""`dkvm doctor`: what on this host stops DKVM (or slows it), and how to fix each."""
import os


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def check_accel():
    from dkvm.host.facts import kvm_usable
    if kvm_usable():
        return "ok", "KVM is usable: VMs run at native speed", ""
    if os.path.isdir("/sys/module/kvm_pvm"):
        why = "/dev/kvm is nested PVM, which cannot boot a stock kernel"
    elif not os.path.exists("/dev/kvm"):
        why = "no /dev/kvm"
    else:
        why = "/dev/kvm does not work"
    return "warn", f"{why}: VMs run under TCG (slow)", \
        "enable virtualisation (VT-x/AMD-V) and load kvm_intel or kvm_amd"


def check_runc():
    from dkvm.errors import DkvmError
    from dkvm.host.facts import find_runc
    try:
        return "ok", f"runc at {find_runc()}", ""
    except DkvmError as err:
        return "fail", err.message, "apt-get install runc"


def check_tun():
    if os.path.exists("/dev/net/tun"):
        return "ok", "/dev/net/tun present", ""
    return "fail", "/dev/net/tun missing: no network for VMs", "modprobe tun"


def check_ip_forward():
    if read("/proc/sys/net/ipv4/ip_forward") == "1":
        return "ok", "net.ipv4.ip_forward=1", ""
    return "fail", "net.ipv4.ip_forward=0: VMs cannot reach beyond their bridge", \
        "sysctl -w net.ipv4.ip_forward=1 (dockerd normally sets it)"


def check_br_netfilter():
    if not os.path.isdir("/proc/sys/net/bridge"):
        return "warn", "br_netfilter not loaded: published ports between containers on one " \
            "bridge may not hairpin", "modprobe br_netfilter"
    return "ok", "br_netfilter loaded", ""


def check_rp_filter():
    strict = [name for name in ("all", "default")
              if read(f"/proc/sys/net/ipv4/conf/{name}/rp_filter") == "1"]
    if strict:
        return "warn", f"strict rp_filter on {', '.join(strict)}: replies from a VM can be " \
            "dropped on hosts with asymmetric routes", \
            "sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.default.rp_filter=2"
    return "ok", "rp_filter is loose or off", ""


def check_policy():
    from dkvm.host.policy import check_policy
    return check_policy()


def check_templates():
    from dkvm.host.templates import check_templates
    return check_templates()


CHECKS = [check_runc, check_accel, check_tun, check_ip_forward, check_br_netfilter,
          check_rp_filter, check_policy, check_templates]


def run_doctor():
    """Each engine on the host (or Docker's check, when none is), then the host."""
    from dkvm.host.registrations import ENGINES
    engines = [engine for engine in ENGINES.values() if engine.present()]
    worst = "ok"
    for check in [engine.check for engine in engines or [ENGINES["docker"]]] + CHECKS:
        status, what, fix = check()
        print(f"[{status:4s}] {what}" + (f"\n       fix: {fix}" if fix else ""))
        if status == "fail":
            worst = "fail"
    return 1 if worst == "fail" else 0
