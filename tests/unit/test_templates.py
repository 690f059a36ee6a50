"""host.templates: which VMs restore from a template, whether one on disk is sound,
and the template's QEMU (the very machine its restores run)."""
import fcntl
import hashlib
import os
import time

from dkvm.container.vmm import restore_argv
from dkvm.host import templates
from dkvm.host.templates import (MANIFEST, RAM, STATE, TemplateSpec, cpu_list,
                                 expected_vcpus, maker_argv, prune_templates, sound, spec_for)
from dkvm.schema import Options, Plan, Process
from unitutil import KERNELS, PAYLOAD_DIR


def plan(boot=KERNELS["dkvm"], **options):
    return Plan(process=Process(args=["true"]), boot=boot, memory_mib=752,
                options=Options(accel="tcg", **options))


def test_a_plain_container_restores_from_its_machines_template():
    spec = spec_for(plan(), 2)
    assert spec.name == "dkvm-tcg-2cpu-752m"
    assert spec.as_dict() == {"kernel": "dkvm", "accel": "tcg", "vcpus": 2, "memory_mib": 752}


def test_what_changes_the_kernels_command_line_or_boot_boots_cold():
    """The template's command line is DKVM's alone, and its kernel is the payload's:
    the image's kernel, the user's arguments or the boot log boot cold, as does
    DKVM_TEMPLATE=0. Debian's kernel has its own templates."""
    assert spec_for(plan(template=False), 2) is None
    assert spec_for(plan(boot=KERNELS["debian"]), 2).name == "debian-tcg-2cpu-752m"
    assert spec_for(plan(kernel_append="mitigations=off"), 2) is None
    assert spec_for(plan(kernel_debug=True), 2) is None
    image = Plan(boot=KERNELS["dkvm"].__class__(name="image", kernel="/share/rootfs/boot/vmlinuz"))
    assert spec_for(image, 2) is None


def test_the_vcpus_are_the_containers_as_the_container_side_counts_them():
    config = {"linux": {"resources": {"cpu": {"cpus": "0-2,5"}}}}
    assert expected_vcpus(Plan(cpus=3), config) == 3
    assert expected_vcpus(Plan(), config) == 4
    assert expected_vcpus(Plan(), {}) == len(os.sched_getaffinity(0))
    assert cpu_list("0-1,3") == {0, 1, 3}
    assert cpu_list("x") == set()


def make_template(top, spec, ram_size=None, state=b"s" * 100, manifest=None):
    directory = top / spec.name
    directory.mkdir(parents=True)
    with open(directory / RAM, "wb") as f:
        f.truncate(spec.memory_mib << 20 if ram_size is None else ram_size)
    (directory / STATE).write_bytes(state)
    fields = manifest or dict(spec.as_dict(), state_size=len(state),
                              state_sha256=hashlib.sha256(state).hexdigest())
    (directory / MANIFEST).write_text(templates.lightjson.dumps(fields))
    return directory


SPEC = TemplateSpec("dkvm", "tcg", 2, 64)


def test_a_template_as_made_is_sound(tmp_path):
    assert sound(make_template(tmp_path, SPEC), SPEC)


def test_a_template_that_is_not_what_its_manifest_or_name_says_is_not(tmp_path):
    assert not sound(make_template(tmp_path / "a", SPEC, ram_size=1 << 20), SPEC)
    assert not sound(make_template(tmp_path / "b", SPEC, manifest=dict(
        SPEC.as_dict(), memory_mib=128, state_size=100)), SPEC)
    assert not sound(make_template(tmp_path / "c", SPEC, manifest=dict(
        SPEC.as_dict(), state_size=99)), SPEC)
    directory = make_template(tmp_path / "d", SPEC)
    (directory / MANIFEST).write_text("[1]")
    assert not sound(directory, SPEC)
    assert not sound(tmp_path / "missing" / SPEC.name, SPEC)


def test_a_state_changed_in_place_is_not_sound(tmp_path):
    """Its size kept: only its hash tells (each container side would refuse it)."""
    directory = make_template(tmp_path, SPEC)
    (directory / STATE).write_bytes(b"t" * 100)
    assert not sound(directory, SPEC)


def test_a_link_where_a_template_goes_is_replaced_not_followed(tmp_path, monkeypatch):
    real = make_template(tmp_path / "real", SPEC)
    top = tmp_path / templates.paths.TEMPLATES_DIR
    top.mkdir()
    os.symlink(real, top / SPEC.name)

    def save(payload_dir, spec, kernel, append, work):
        make_template(tmp_path / "made", spec)
        for name in os.listdir(tmp_path / "made" / spec.name):
            os.rename(tmp_path / "made" / spec.name / name, os.path.join(work, name))
    monkeypatch.setattr(templates, "save_template", save)
    assert templates.make_template(str(tmp_path), SPEC, KERNELS["dkvm"]) is True
    assert (top / SPEC.name).is_dir() and not (top / SPEC.name).is_symlink()
    assert sound(top / SPEC.name, SPEC)
    assert sorted(os.listdir(real)) == [RAM, STATE, MANIFEST]      # the link's target kept


def test_links_are_not_followed(tmp_path):
    real = make_template(tmp_path / "real", SPEC)
    (tmp_path / "top").mkdir()
    os.symlink(real, tmp_path / "top" / SPEC.name)
    assert not sound(tmp_path / "top" / SPEC.name, SPEC)
    other = make_template(tmp_path / "other", SPEC)
    os.rename(other / RAM, other / "elsewhere")
    os.symlink(other / "elsewhere", other / RAM)
    assert not sound(other, SPEC)


def test_at_most_so_many_templates_stay_the_least_recently_used_go(tmp_path):
    names = []
    for number in range(templates.MOST_TEMPLATES + 3):
        spec = TemplateSpec("dkvm", "tcg", 1, 64 + number)
        directory = make_template(tmp_path, spec)
        os.utime(directory / MANIFEST, (1000 + number, 1000 + number))
        names.append(spec.name)
    os.utime(tmp_path / names[0] / MANIFEST, (5000, 5000))       # used again lately
    prune_templates(str(tmp_path), keep=names[1])
    left = set(os.listdir(tmp_path))
    assert names[0] in left and names[1] in left
    assert len(left) == templates.MOST_TEMPLATES + 1              # and `keep`
    assert names[2] not in left


def test_one_maker_at_a_time_the_others_boot_cold(tmp_path, monkeypatch):
    """A concurrent create finds the lock held and makes nothing (its VM boots cold)."""
    top = tmp_path / templates.paths.TEMPLATES_DIR
    top.mkdir()
    made = []
    monkeypatch.setattr(templates, "save_template", lambda *args: made.append(args))
    with open(top / templates.LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert templates.make_template(str(tmp_path), SPEC, KERNELS["dkvm"]) is False
    assert made == []


def test_the_template_is_made_on_the_machine_its_restores_run():
    """Restoring needs the very machine that was saved: same QEMU options and devices
    in the same order; only the backends (chardevs' paths, the RAM's file) differ."""
    spec = TemplateSpec("dkvm", "tcg", 2, 752)
    made = maker_argv(PAYLOAD_DIR, spec, PAYLOAD_DIR + "/kernels/dkvm/vmlinux", [], "/work")
    restored = restore_argv(plan(), 2, 10, 11, ram_fd=12)

    def machine(argv, payload):
        text = " ".join(argv).replace(payload, "<payload>")
        text = text.replace(" -chardev ", "\n-chardev ").replace(" -qmp ", "\n-qmp ")
        keep = [line for line in text.split("\n") if not line.startswith(("-chardev", "-qmp"))]
        return [word for word in " ".join(keep).split()
                if not word.startswith(("memory-backend-file", "defer", "-incoming"))]
    assert machine(made, PAYLOAD_DIR) == machine(restored, "/.dkvm")
    for chardev in ("ctl", "con", "out", "err", "in", "console"):
        assert any(arg.endswith(f"id={chardev}") or f"id={chardev}," in arg for arg in made)
        assert any(arg.endswith(f"id={chardev}") or f"id={chardev}," in arg for arg in restored)


def test_a_template_that_could_not_be_made_is_not_tried_again_at_once(tmp_path, monkeypatch):
    """Each try costs a create up to BOOT_WAIT: after a failure, creates boot cold for
    a while; the half-made directory does not stay."""
    tries = []

    def fail(payload_dir, spec, kernel, append, work):
        tries.append(work)
        with open(os.path.join(work, "console.log"), "w") as f:
            f.write("x" * templates.MAKER_LOG_END + "Kernel panic - not syncing\n")
        raise templates.DkvmError("the template's VM did not boot")
    monkeypatch.setattr(templates, "save_template", fail)
    assert templates.make_template(str(tmp_path), SPEC, KERNELS["dkvm"]) is False
    assert templates.make_template(str(tmp_path), SPEC, KERNELS["dkvm"]) is False
    assert len(tries) == 1
    top = tmp_path / templates.paths.TEMPLATES_DIR
    assert sorted(os.listdir(top)) == sorted([templates.LOCK, f".failed-{SPEC.name}"])
    # why, with the end of the VM's console (QEMU's log was never written)
    why = (top / f".failed-{SPEC.name}").read_text()
    assert why.startswith("the template's VM did not boot\n--- console.log\n")
    assert why.endswith("Kernel panic - not syncing\n\n") and len(why) < 2 * templates.MAKER_LOG_END
    old = time.time() - templates.RETRY_AFTER - 1
    os.utime(top / f".failed-{SPEC.name}", (old, old))
    assert templates.make_template(str(tmp_path), SPEC, KERNELS["dkvm"]) is False
    assert len(tries) == 2
