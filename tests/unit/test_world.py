"""guest.world: a VM restored from its template takes its own clock, entropy and
export before anything else; the static device nodes a kernel's modules.devname lists."""
import sys

from dkvm import paths
from dkvm.guest import network, syscalls, world
from dkvm.schema import Interface, Plan


def test_a_restored_vm_sets_its_clock_reseeds_and_mounts_its_hot_plugged_export(monkeypatch):
    calls = []
    attempts = iter([OSError(22, "no tag yet"), OSError(22, "no tag yet"), None])

    def mount(source, target, fstype, *args, **kw):
        failure = next(attempts)
        calls.append(("mount", source, target, fstype))
        if failure:
            raise failure
    monkeypatch.setattr(syscalls, "set_wall_clock", lambda ns: calls.append(("clock", ns)))
    monkeypatch.setattr(syscalls, "add_entropy", lambda seed: calls.append(("entropy", seed)))
    monkeypatch.setattr(syscalls, "mount", mount)
    monkeypatch.setattr(syscalls, "bind_mount",
                        lambda source, target, readonly=False: calls.append(
                            ("bind", source, target, readonly)))
    monkeypatch.setattr(network, "wait_for_links", lambda macs: calls.append(("links", macs)))
    monkeypatch.setattr(world.time, "sleep", lambda seconds: None)
    sys.path_importer_cache["/nowhere"] = None
    plan = Plan(wall_clock_ns=1_796_000_000_123_456_789, entropy="ab" * 32,
                interfaces=[Interface(mac="02:42:ac:11:00:02")])
    world.resume_from_template(plan)
    assert calls[:2] == [("clock", 1_796_000_000_123_456_789), ("entropy", b"\xab" * 32)]
    assert calls[2:5] == [("mount", paths.VIRTIOFS_TAG, paths.SHARE_DIR, "virtiofs")] * 3
    assert calls[5] == ("bind", paths.SHARED_PAYLOAD, paths.PAYLOAD_MOUNT, True)
    assert calls[6] == ("links", ["02:42:ac:11:00:02"])
    assert "/nowhere" not in sys.path_importer_cache     # the payload's files found anew


def test_an_export_that_never_comes_is_one_line(monkeypatch):
    def mount(*args, **kw):
        raise OSError(22, "Invalid argument")
    monkeypatch.setattr(syscalls, "set_wall_clock", lambda ns: None)
    monkeypatch.setattr(syscalls, "add_entropy", lambda seed: None)
    monkeypatch.setattr(syscalls, "mount", mount)
    monkeypatch.setattr(world, "EXPORT_WAIT", 0.01)
    try:
        world.resume_from_template(Plan(entropy="00"))
    except world.DkvmError as err:
        assert "the container's export did not appear" in err.message
    else:
        raise AssertionError("no error")


DEVNAME = "# Device nodes to trigger on-demand module loading.\ntun net/tun c10:200\n"


def test_an_image_kernels_own_modules_devname_is_read_as_it_is(tmp_path):
    (tmp_path / "modules.devname").write_text(DEVNAME)
    assert world.static_nodes(str(tmp_path)) == DEVNAME.splitlines()
    assert world.static_nodes(str(tmp_path / "none")) == []
