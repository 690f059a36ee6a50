"""Where code runs is the folder it is in, and the import rule that keeps the sides
apart holds: host code (dkvm/host) runs on the host, container code (dkvm/container)
in the container on the host's kernel, guest code (dkvm/guest) in the VM; each
imports only its own side and the shared modules at dkvm's top, which import only
each other; host and container code may also import dkvm/boot (the image's kernel,
initramfs, files in the image's tree), which the guest never does. The roles are
thin mains, each on one side. And the README's flag table names only tests that exist."""
import ast
import subprocess
import sys

import pytest

from unitutil import REPO

PACKAGE = REPO / "dkvm"
# dkvm/boot: booting a kernel that is not the payload's, the host's and the container
# side's (and build.py's), never the guest's
SIDES = ("host", "container", "guest", "boot")
ROLE_SIDES = {"runtime": "host", "cli": "host", "ctr_entrypoint": "container",
              "exec_relay": "container", "vm_init": "guest", "pod_member": "container"}
ALLOWED = {"host": {"host", "shared", "boot"}, "container": {"container", "shared", "boot"},
           "guest": {"guest", "shared"}, "boot": {"boot", "shared"}, "shared": {"shared"}}


def module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules():
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def side_of(module):
    """host, container, guest or shared; None for dispatch itself (__main__)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in SIDES:
        return parts[1]
    if len(parts) > 1 and parts[1] == "roles":
        return ROLE_SIDES.get(parts[2]) if len(parts) > 2 else "shared"
    if module == "dkvm.__main__":
        return None
    return "shared"


def imported_dkvm_modules(source, known):
    """Every dkvm module a source imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "dkvm"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "dkvm":
            for alias in node.names:      # `from dkvm.guest import network`: a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return found


def violations(module, source, known):
    side = side_of(module)
    if side is None:
        return []
    return [f"{module} ({side}) imports {other} ({side_of(other)})"
            for other in sorted(imported_dkvm_modules(source, known))
            if side_of(other) not in ALLOWED[side] and other != "dkvm"]


def test_no_module_imports_across_sides():
    known = all_modules()
    found = [v for module, path in known.items()
             for v in violations(module, path.read_text(), known)]
    assert found == []


@pytest.mark.parametrize("module,source", [
    ("dkvm.guest.loop", "from dkvm.container import vmm"),
    ("dkvm.guest.loop", "def f():\n    from dkvm.host.payload import ensure_payload"),
    ("dkvm.container.supervisor", "import dkvm.guest.network"),
    ("dkvm.host.rewrite", "from dkvm.container.vmm import qemu_argv"),
    ("dkvm.wire", "from dkvm.guest import syscalls"),
    ("dkvm.roles.exec_relay", "from dkvm.host.rewrite import rewrite_exec_process"),
])
def test_the_rule_catches_a_crossing(module, source):
    assert len(violations(module, source, all_modules())) == 1


def test_every_module_is_on_a_side_and_the_roles_are_the_known_ones():
    known = all_modules()
    roles = {name.split(".")[2] for name in known if name.startswith("dkvm.roles.")}
    assert roles == set(ROLE_SIDES)
    for folder in SIDES + ("roles",):
        assert f"dkvm.{folder}" in known, f"dkvm/{folder} has no __init__.py"


def test_roles_are_thin():
    """A role reads as its story; the work is in its side's modules."""
    for role in ROLE_SIDES:
        lines = (PACKAGE / "roles" / f"{role}.py").read_text().splitlines()
        assert len(lines) <= 120, f"roles/{role}.py has {len(lines)} lines"


def test_nothing_imports_a_role():
    known = all_modules()
    for module, path in known.items():
        if module != "dkvm.__main__":
            assert not any(other.startswith("dkvm.roles.")
                           for other in imported_dkvm_modules(path.read_text(), known)), module


GUEST_FORBIDDEN = ["json", "re", "enum", "socket", "signal", "importlib", "typing",
                   "dataclasses", "pyroute2", "subprocess", "threading"]


def modules_loaded_by(modules):
    """sys.modules after importing `modules` in a fresh interpreter, as the guest
    starts one (no site, no environment)."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
         f"for m in {modules!r}: __import__(m)\n"
         "print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_the_guest_imports_nothing_that_costs_its_boot():
    """Every guest module and the shared ones, in a fresh interpreter as the guest
    starts it: none of these (each costs tenths of a second under TCG)."""
    guest = [m for m in all_modules() if side_of(m) in ("guest", "shared")
             and not m.startswith("dkvm.roles")] + ["dkvm.roles.vm_init", "dkvm.__main__"]
    assert sorted(set(GUEST_FORBIDDEN) & modules_loaded_by(guest)) == []


def test_the_guest_reads_the_options_table_not_the_hosts_reading_of_it():
    """The guest's option defaults come from the table (dkvm.options: data, no imports);
    reading a value (kinds, bounds, permissions: host.settings, and the kernel argument
    rules it checks with) loads on the host only."""
    loaded = modules_loaded_by(["dkvm.roles.vm_init", "dkvm.guest.world", "dkvm.guest.loop"])
    assert "dkvm.options" in loaded
    assert {"dkvm.host", "dkvm.host.settings", "dkvm.kernel_args"} & loaded == set()
    table = ast.parse((PACKAGE / "options.py").read_text())
    assert not [node for node in ast.walk(table)
                if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_no_test_imports_another():
    """Shared helpers are in the helper modules (unitutil, harness, conftest;
    dockerutil for e2e), so a test file can be read, moved or deleted alone."""
    found = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(REPO)} imports {name}" for name in names
                      if name.split(".")[-1].startswith("test_")]
    assert found == []


def test_every_test_the_readmes_flag_table_names_exists():
    """The flag table says how each row is tested: each test it names is real."""
    import re
    repo = REPO
    table = (repo / "README.md").read_text().split("## docker run flags and signals", 1)[1]
    table = table.split("\n## ", 1)[0]
    named = set(re.findall(r"`(?:[\w.]+::)?(test_\w+)`", table))
    defined = set()
    for path in (repo / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    assert len(named) >= 12
    assert named <= defined, sorted(named - defined)
