"""dkvm: the host command. `install` registers the runtime with the engines (and writes
the default policy file where there is none); `doctor` says what on this host stops
DKVM and what the policy lets containers set; `version` and `kernels` say what this
build carries."""
import argparse

from dkvm import __version__


def main(argv):
    parser = argparse.ArgumentParser(
        prog="dkvm", description="Run container images as virtual machines: "
        "docker run --runtime=dkvm IMAGE")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    inst = sub.add_parser("install", help="install dkvm, register the runtime with the "
                          "engines (Docker, Podman, containerd) and write the default "
                          "policy (/etc/dkvm/policy.json) if there is none")
    inst.add_argument("--bin-dir", default="/usr/local/bin")
    inst.add_argument("--runc", default="", help="path of the real runc (default: found in PATH)")
    uninst = sub.add_parser("uninstall", help="unregister the runtime and remove dkvm")
    uninst.add_argument("--bin-dir", default="/usr/local/bin")
    for command, what in ((inst, "register with"), (uninst, "unregister from, keeping the "
                                                     "files")):
        command.add_argument("--engine", action="append", default=[],
                             help=f"docker, podman or containerd: the engine to {what} "
                             "(repeat, or separate by commas; default: those on this host)")
    sub.add_parser("version", help="print the version and build id")
    sub.add_parser("kernels", help="list the guest kernels this build carries")
    sub.add_parser("doctor", help="check what on this host stops or slows DKVM")
    args = parser.parse_args(argv[1:])
    if args.command == "install":
        from dkvm.host.install import install
        from dkvm.host.registrations import choose_engines
        return install(args.bin_dir, args.runc, choose_engines(args.engine))
    if args.command == "uninstall":
        from dkvm.host.install import uninstall
        from dkvm.host.registrations import ENGINES, choose_engines
        engines = choose_engines(args.engine) if args.engine else list(ENGINES.values())
        return uninstall(args.bin_dir, engines, keep_files=bool(args.engine))
    if args.command == "version":
        from dkvm.host.payload import build_id
        print(f"dkvm {__version__} build {build_id()}")
        return 0
    if args.command == "doctor":
        from dkvm.host.doctor import run_doctor
        return run_doctor()
    if args.command == "kernels":
        from dkvm.host.payload import ensure_payload, payload_kernels
        print("\n".join(kernel_table(payload_kernels(ensure_payload()))))
        return 0
    parser.print_help()
    return 0


def kernel_table(kernels):
    """`dkvm kernels`: each kernel the build carries, and the image's own, with its
    release, how it boots and where it comes from; the default marked."""
    from dkvm.options import BY_ENV, IMAGE_KERNEL
    default = BY_ENV["DKVM_KERNEL"].default
    rows = [("NAME", "RELEASE", "BOOT", "SOURCE")]
    for name, boot in kernels.items():
        how = "ELF (PVH) + initramfs" if boot.initrd else "ELF (PVH), the export as root"
        rows.append((name + ("*" if name == default else ""), boot.release, how, boot.source))
    rows.append((IMAGE_KERNEL, "the image's", "its bzImage + initramfs of its modules",
                 "/vmlinuz, /boot/vmlinuz or /boot/vmlinuz-<release> in the image"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3]
             for row in rows]
    return lines + ["* the default. Choose with --env DKVM_KERNEL=<name> or <name>/<release>; "
                    f"{IMAGE_KERNEL} only where the operator allows it (/etc/dkvm/policy.json)."]
