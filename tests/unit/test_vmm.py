"""QEMU's and virtiofsd's command lines built from the plan (container/vmm.py): the
kernel's command line, the devices, a hot-plugged NIC's options as the boot's."""
import pytest

from unitutil import KERNELS
from dkvm import paths
from dkvm.container.vmm import (command_line_options, kernel_append, nic_options, qemu_argv,
                                qemu_env, restore_argv, restore_devices, virtiofsd_argv)
from dkvm.schema import Boot, Disk, Interface, Options, Plan, Process


def make_plan(terminal=False, boot=KERNELS["debian"], **kw):
    """A plan as the entrypoint has it; `kw` are plan fields or options."""
    options = {k: kw.pop(k) for k in list(kw) if k in Options.FIELDS}
    return Plan(process=Process(args=["true"], terminal=terminal), boot=boot,
                options=Options(**options), **kw)


def values(argv, flag):
    """Every value given to `flag` (QEMU flags take one argument each)."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def value(argv, flag):
    (v,) = values(argv, flag)
    return v


def devices(argv):
    return values(argv, "-device")


def chardevs(argv):
    return {c.split(",", 1)[1].split(",")[0].removeprefix("id="): c
            for c in values(argv, "-chardev")}


def test_runs_payload_qemu_through_payload_loader():
    argv = qemu_argv(make_plan(), 1, 10, 11)
    assert argv[:4] == ["/.dkvm/lib/ld-linux-x86-64.so.2", "--library-path", "/.dkvm/lib",
                        "/.dkvm/qemu/qemu-system-x86_64"]
    assert value(argv, "-L") == "/.dkvm/qemu/firmware"
    assert "-nodefaults" in argv and "-no-reboot" in argv
    # QEMU's own seccomp filter, with everything it can deny denied
    assert value(argv, "-sandbox").split(",") == ["on", "obsolete=deny",
                                                  "elevateprivileges=deny", "spawn=deny",
                                                  "resourcecontrol=deny"]


def test_a_kernel_without_an_initramfs_boots_without_one():
    boot = Boot(release="6.1-fast", kernel="/.dkvm/kernels/fast/vmlinux",
                append=["rootfstype=virtiofs", "root=root"])
    argv = qemu_argv(make_plan(boot=boot), 1, 10, 11)
    assert value(argv, "-kernel") == "/.dkvm/kernels/fast/vmlinux"
    assert "-initrd" not in argv
    # the kernel's own arguments come after DKVM's, before the user's
    append = kernel_append(make_plan(boot=boot, kernel_append="dkvm.x=1")).split()
    assert append.index("acpi=noirq") < append.index("rootfstype=virtiofs") < \
        append.index("dkvm.x=1")


def test_tcg_accel():
    argv = qemu_argv(make_plan(accel="tcg"), 2, 10, 11)
    assert value(argv, "-accel") == "tcg,thread=multi"
    assert value(argv, "-cpu") == "max"
    assert not any("kvm" in v for v in values(argv, "-accel") + values(argv, "-machine"))


def test_kvm_accel():
    argv = qemu_argv(make_plan(accel="kvm"), 2, 10, 11)
    assert value(argv, "-accel") == "kvm"
    assert value(argv, "-cpu") == "host"
    assert "tcg" not in " ".join(argv)
    assert not any("thread=multi" in a for a in argv)


@pytest.mark.parametrize("vcpus,mem", [(1, 192), (2, 512), (16, 4096)])
def test_smp_and_memory_follow_plan(vcpus, mem):
    argv = qemu_argv(make_plan(memory_mib=mem, cpus=vcpus), vcpus, 10, 11)
    assert value(argv, "-smp") == str(vcpus)
    assert value(argv, "-m") == f"{mem}M"
    backend = value(argv, "-object")
    assert backend.startswith("memory-backend-memfd,id=mem,")
    assert f"size={mem}M" in backend.split(",") and "share=on" in backend.split(",")
    assert "memory-backend=mem" in value(argv, "-machine").split(",")


def test_tcg_translation_cache_from_the_plan():
    assert value(qemu_argv(make_plan(accel="tcg", tcg_cache_mib=64), 2, 10, 11),
                 "-accel") == "tcg,thread=multi,tb-size=64"
    assert value(qemu_argv(make_plan(accel="tcg"), 2, 10, 11), "-accel") == "tcg,thread=multi"


def test_kernel_from_the_boot_descriptor():
    argv = qemu_argv(make_plan(), 1, 10, 11)
    assert value(argv, "-kernel") == "/.dkvm/kernels/debian/vmlinux"
    assert value(argv, "-initrd") == "/.dkvm/kernels/debian/initrd.img"


def test_virtiofs_and_control_port():
    argv = qemu_argv(make_plan(), 1, 10, 11)
    chars = chardevs(argv)
    assert chars["vfs"] == f"socket,id=vfs,path={paths.VIRTIOFS_SOCKET}"
    assert chars["ctl"] == f"socket,id=ctl,path={paths.CONTROL_SOCKET}"
    assert any(d.startswith("vhost-user-fs-pci,chardev=vfs,tag=root") for d in devices(argv))
    assert "virtserialport,bus=ser0.0,nr=1,chardev=ctl,name=org.dkvm.control" in devices(argv)


def test_every_vm_reports_free_pages_and_has_a_generation_id():
    """Free page reporting gives the host back what the guest frees; vmgenid reseeds a
    restored guest's RNG: on every kernel and accelerator."""
    for plan in (make_plan(), make_plan(accel="kvm"), make_plan(boot=KERNELS["dkvm"])):
        found = devices(qemu_argv(plan, 1, 10, 11))
        assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on" in found
        assert "vmgenid,id=vmgenid0" in found


def test_terminal_uses_a_console_on_stdio():
    argv = qemu_argv(make_plan(terminal=True), 1, 10, 11)
    chars = chardevs(argv)
    assert chars["con"].startswith("stdio,id=con")
    assert "signal=off" in chars["con"]     # ^C goes to the workload, not QEMU
    assert "virtconsole,bus=ser0.0,nr=0,chardev=con" in devices(argv)
    assert "out" not in chars and "err" not in chars
    assert not any(paths.PORT_STDOUT in d or paths.PORT_STDERR in d for d in devices(argv))
    assert not any("/proc/self/fd/" in c for c in chars.values())


def test_non_terminal_has_stdout_and_stderr_ports():
    argv = qemu_argv(make_plan(terminal=False), 1, 7, 9)
    chars = chardevs(argv)
    assert chars["out"] == "file,id=out,path=/proc/self/fd/7"
    assert chars["err"] == "file,id=err,path=/proc/self/fd/9"
    devs = devices(argv)
    assert "virtserialport,bus=ser0.0,nr=2,chardev=out,name=org.dkvm.stdout" in devs
    assert "virtserialport,bus=ser0.0,nr=3,chardev=err,name=org.dkvm.stderr" in devs
    assert "con" not in chars
    assert not any(d.startswith("virtconsole") for d in devs)
    # port numbers on the bus are unique
    nrs = [p.split("nr=")[1].split(",")[0] for p in devs if "bus=ser0.0" in p]
    assert len(nrs) == len(set(nrs))


def test_kernel_debug_puts_the_serial_console_on_stderr():
    argv = qemu_argv(make_plan(kernel_debug=True), 1, 7, 9)
    append = value(argv, "-append").split()
    assert "console=ttyS0" in append and "quiet" not in append
    assert chardevs(argv)["console"] == "file,id=console,path=/proc/self/fd/9"
    assert value(argv, "-serial") == "chardev:console"


def test_quiet_without_debug_console_errors_go_to_a_file():
    argv = qemu_argv(make_plan(kernel_debug=False), 1, 7, 9)
    append = value(argv, "-append").split()
    assert "quiet" in append and "console=ttyS0" in append
    assert chardevs(argv)["console"] == f"file,id=console,path={paths.CONSOLE_LOG}"
    assert value(argv, "-serial") == "chardev:console"


def test_kernel_append_passes_through_last():
    plan = make_plan(kernel_append="init_on_free=1 mitigations=off")
    append = value(qemu_argv(plan, 1, 7, 9), "-append")
    assert append == kernel_append(plan)
    assert append.endswith(" init_on_free=1 mitigations=off")
    assert "panic=-1" in append.split()
    assert not kernel_append(make_plan()).endswith(" ")


def test_qemu_env_and_virtiofsd():
    assert qemu_env() == {"QEMU_MODULE_DIR": "/.dkvm/qemu/modules"}
    argv = virtiofsd_argv(5)
    assert argv[3] == "/.dkvm/qemu/virtiofsd"
    assert "--fd=5" in argv                     # the entrypoint's socket: no pidfile
    assert not any(a.startswith("--socket-path") for a in argv)
    assert values(argv, "-o")[:2] == ["source=/share", "sandbox=chroot"]
    assert "modcaps=+sys_admin" not in values(argv, "-o")
    assert "--rlimit-nofile=0" in argv          # 0: as it is
    assert "no_readdirplus" not in values(argv, "-o")
    # under a low limit, an inode per lookup, not one per entry listed
    assert "no_readdirplus" in values(virtiofsd_argv(5, nofile=20000), "-o")
    assert "no_readdirplus" not in values(virtiofsd_argv(5, nofile=1 << 20), "-o")
    assert "--rlimit-nofile=20000" in virtiofsd_argv(5, nofile=20000)
    assert {"cache=always", "timeout=1"} <= set(values(argv, "-o"))
    # a pod's volume, which the host changes too: asked again every time
    coherent = values(virtiofsd_argv(5, coherent=True), "-o")
    assert {"cache=auto", "timeout=0"} <= set(coherent) and "cache=always" not in coherent


def test_sys_admin_reaches_virtiofsd():
    """virtiofsd drops CAP_SYS_ADMIN unless told to keep it."""
    assert "modcaps=+sys_admin" in values(virtiofsd_argv(5, sys_admin=True), "-o")


def test_each_interface_gets_a_tap_and_a_nic_with_ids_for_unplugging():
    plan = make_plan(interfaces=[Interface(mac="02:42:ac:11:00:02"),
                                 Interface(mac="02:42:0a:7b:2d:0a")])
    argv = qemu_argv(plan, 1, 10, 11)
    assert values(argv, "-netdev") == [
        "tap,id=net0,ifname=dkvm-tap0,script=no,downscript=no",
        "tap,id=net1,ifname=dkvm-tap1,script=no,downscript=no"]
    nics = [d for d in devices(argv) if d.startswith("virtio-net-pci")]
    assert nics == ["virtio-net-pci,netdev=net0,id=nic0,mac=02:42:ac:11:00:02,romfile=,status=off",
                    "virtio-net-pci,netdev=net1,id=nic1,mac=02:42:0a:7b:2d:0a,romfile=,status=off"]


def test_each_disk_is_an_fd_set_of_its_open_files_and_a_virtio_blk_device():
    disks = [Disk(file="/a.img", mount_point="/a", serial="dkvm-disk0"),
             Disk(file="/b.img", mount_point="/b", serial="dkvm-disk1")]
    argv = qemu_argv(make_plan(disks=disks), 1, 3, 4, [(10, 11), (12, 13)])
    assert values(argv, "-add-fd") == ["fd=10,set=1", "fd=11,set=1", "fd=12,set=2",
                                       "fd=13,set=2"]
    assert [d.split(",")[0] for d in values(argv, "-drive")] == ["file=/dev/fdset/1",
                                                                 "file=/dev/fdset/2"]
    assert [d for d in devices(argv) if d.startswith("virtio-blk-pci")] == [
        "virtio-blk-pci,drive=disk0,serial=dkvm-disk0,id=blk0",
        "virtio-blk-pci,drive=disk1,serial=dkvm-disk1,id=blk1"]
    assert "-drive" not in qemu_argv(make_plan(), 1, 3, 4)


def test_a_minus_word_in_kernel_append_takes_dkvms_argument_away():
    append = kernel_append(make_plan(kernel_append="-tsc -no_timer_check=x -no_timer_check "
                                                    "-quiet mitigations=off")).split()
    assert "tsc=reliable" not in append and "no_timer_check" not in append
    assert "quiet" not in append and "console=ttyS0" in append
    assert append[-1] == "mitigations=off" and "panic=-1" in append
    assert not [word for word in append if word.startswith("-")]


def test_a_kernel_without_initramfs_boots_the_export_with_dkvms_init_from_the_payload():
    plan = Plan()
    plan.boot.kernel = "/.dkvm/kernels/dkvm/vmlinux"
    plan.options.kernel_append = "mitigations=off"
    append = kernel_append(plan).split()
    assert {"root=root", "rootfstype=virtiofs", "rw",
            "init=/dkvm/lib/ld-linux-x86-64.so.2"} <= set(append)
    # the init's arguments come last, after the user's, where the kernel passes them on
    assert append[append.index("mitigations=off"):] == [
        "mitigations=off", "--", "--library-path", "/dkvm/lib", "/dkvm/python/bin/python3",
        "-I", "-S", "/dkvm/entry/dkvm-vm-init", "--enter-own-root"]
    plan.boot.initrd = "/.dkvm/kernels/debian/initrd.img"
    assert not [arg for arg in kernel_append(plan).split() if arg.startswith(("root=", "init="))]


def test_hot_plugged_nic_options_match_the_boot_command_line():
    netdev, device = nic_options(3, "02:42:0a:00:00:05")
    assert netdev == {"type": "tap", "id": "net3", "ifname": "dkvm-tap3", "script": "no",
                      "downscript": "no"}
    assert device["id"] == "nic3" and device["netdev"] == "net3"
    assert command_line_options(device, "driver") == (
        "virtio-net-pci,netdev=net3,id=nic3,mac=02:42:0a:00:00:05,romfile=,status=off")


def restored_plan(terminal=False):
    return make_plan(terminal=terminal, boot=KERNELS["dkvm"], template="t",
                     interfaces=[Interface(mac="02:42:ac:11:00:02")],
                     disks=[Disk(file="/a.img", mount_point="/a", serial="dkvm-disk0")])


def test_a_restore_runs_the_templates_kernel_on_the_vms_own_ram_and_waits_for_its_state():
    argv = restore_argv(restored_plan(), 2, 10, 11, ram_fd=12, disk_fds=[(13, 14)])
    assert value(argv, "-incoming") == "defer"
    assert "memory-backend-file,mem-path=/proc/self/fd/12,id=mem,size=1024M,share=on" in \
        values(argv, "-object")
    assert value(argv, "-initrd") == "/.dkvm/kernels/dkvm/" + paths.TEMPLATE_INITRD
    assert "rootfstype=virtiofs" not in value(argv, "-append")
    chars = chardevs(argv)
    assert chars["vfs"] == f"socket,id=vfs,path={paths.VIRTIOFS_SOCKET}"
    assert chars["out"] == "file,id=out,path=/proc/self/fd/10"
    assert chars["con"] == "null,id=con"
    # the export, the NIC and the disk: backends here, their devices hot-plugged
    assert values(argv, "-netdev")[0].startswith("tap,id=net0")
    assert not [d for d in devices(argv) if d.startswith(("vhost-user-fs", "virtio-net",
                                                          "virtio-blk"))]


def test_a_restored_terminal_is_the_consoles_stdio():
    chars = chardevs(restore_argv(restored_plan(terminal=True), 2, 10, 11, ram_fd=12))
    assert chars["con"].startswith("stdio,id=con")
    assert chars["out"] == "null,id=out"


def test_a_restored_vm_gets_its_export_first_then_nics_then_disks():
    plugged = restore_devices(restored_plan())
    assert [device["driver"] for device in plugged] == ["vhost-user-fs-pci", "virtio-net-pci",
                                                        "virtio-blk-pci"]
    assert plugged[0]["tag"] == paths.VIRTIOFS_TAG
    assert plugged[2]["serial"] == "dkvm-disk0"
