#!/usr/bin/env python3
"""Build dist/dkvm.pyz: the dkvm package (shiv zipapp) plus the payload.

The payload is everything a container or a guest needs and an image may lack: a
Python that runs in any image (bundled loader and libraries), QEMU and virtiofsd,
a static busybox, the guest's first scripts (guest-init/), and the guest kernels
that kernels/*/recipe.toml describe (kernels/make.py). It comes from Debian packages
on the build machine, installed with apt when missing.

The build id is a hash of the payload and the Python tree, so two builds from the
same tree and the same packages give the same id.
"""
import argparse
import compileall
import hashlib
import importlib.util
import io
import json
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from dkvm import paths  # noqa: E402
from dkvm.__main__ import module, program  # noqa: E402
from dkvm.host.payload import PAYLOAD_BUILD_ID, PAYLOAD_MEMBER  # noqa: E402
from kernels.make import build_kernels  # noqa: E402
BUILD = ROOT / "build"
DIST = ROOT / "dist"
PYROUTE2 = "pyroute2==0.9.7"

APT_PACKAGES = {
    # command or file that must exist -> Debian package providing it
    "/usr/bin/qemu-system-x86_64": "qemu-system-x86",
    "/usr/lib/qemu/virtiofsd": "qemu-system-common",
    "/usr/share/seabios/bios-256k.bin": "seabios",
    "/bin/busybox": "busybox-static",
    "/usr/bin/python3.11": "python3.11",
    "/sbin/depmod": "kmod",
    "/sbin/mke2fs": "e2fsprogs",
}
PY_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
                  "pydoc_data", "site-packages", "dist-packages", "__pycache__",
                  "unittest/test", "distutils/tests", "ctypes/test", "sqlite3/test",
                  "config-3.11-x86_64-linux-gnu"}
QEMU_FIRMWARE = ["/usr/share/seabios/bios-256k.bin", "/usr/share/qemu/pvh.bin",
                 "/usr/share/qemu/linuxboot_dma.bin", "/usr/share/qemu/kvmvapic.bin"]
QEMU_MODULES = ["accel-tcg-x86_64.so"]
# In-container and in-guest roles start as `python3 <payload>/entry/<role>`: the
# script's name is argv[0], which picks the role as it does on the host.
PAYLOAD_ROLE_NAMES = ["ctr-entrypoint", "vm-init", "exec-relay", "pod-member"]
ROLE_ENTRIES = [program(role) for role in PAYLOAD_ROLE_NAMES]
# Each role reads as few zip directories as it can (zipimport parses one in Python,
# a few milliseconds per hundred entries under TCG): the standard library its roles
# import (python311.zip, read at start), then dkvm's own; the rest of the standard
# library and pyroute2 come last, read only by the role that imports from them.
ENTRY_SCRIPT = """import os, sys
root = os.path.dirname(os.path.dirname(__file__))
sys.path[1:1] = [os.path.join(root, "dkvm.zip")]
more = os.path.join(root, "python", "lib", "python-more.zip")
sys.path += [more, os.path.join(root, "site-packages.zip")]
sys.modules["encodings"].__path__.append(os.path.join(more, "encodings"))
from dkvm.__main__ import main
main()
"""
# The roles that run on the payload's Python (the host's run on the host's).
PAYLOAD_ROLES = [module(role) for role in PAYLOAD_ROLE_NAMES]
# What they import inside functions on their usual paths (`docker exec -t`, the
# entrypoint's rlimits, QEMU's child dropping its capabilities, pyroute2's loader).
PAYLOAD_LAZY_IMPORTS = ["termios", "tty", "resource", "ctypes", "importlib.util"]
# Every module of the guest's (a template's initramfs holds what they load)
GUEST_MODULES = ["dkvm.roles.vm_init"] + [
    f"dkvm.guest.{path.stem}" for path in sorted((ROOT / "dkvm" / "guest").glob("*.py"))
    if path.stem != "__init__"]
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# The archive's first lines, in place of shiv's shebang: sh reads them and execs
# Python, never reaching the zip after them (Python finds a zip from its end). The
# runtime wrapper runs on every docker operation, so it runs straight from the
# archive (zipimport, with the byte code the build puts beside each dkvm module):
# without runpy, which Python imports to run any zipapp (3 ms), and without shiv's
# bootstrap, which imports half the standard library to find or unpack
# site-packages. Every other role goes through shiv, as `python3 dkvm.pyz` does.
PREAMBLE = """#!/bin/sh
exec /usr/bin/python3 -IS -c 'import sys
del sys.argv[0]
if sys.argv[0].rpartition("/")[2] == "dkvm-runtime":
    sys.path.insert(0, sys.argv[0] + "/site-packages")
    from dkvm.__main__ import main
    main()
else:
    import runpy
    sys.path.insert(0, sys.argv[0])
    runpy._run_module_as_main("__main__", False)' "$0" "$@"
"""


def log(msg):
    print(f"build: {msg}", file=sys.stderr, flush=True)


def ensure_packages():
    apt_install(sorted({pkg for path, pkg in APT_PACKAGES.items() if not os.path.exists(path)}))


def apt_install(packages):
    """Install the Debian packages of `packages` that are not installed yet."""
    missing = [pkg for pkg in packages if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
        text=True).stdout != "install ok installed"]
    if missing:
        log(f"installing {' '.join(missing)} with apt")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", *missing]
        if subprocess.run(install, env=env).returncode != 0:     # stale package lists?
            subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
            subprocess.run(install, check=True, env=env)


def elf_deps(paths):
    """Shared libraries (soname -> real path) needed by the ELF files, and the loader."""
    libs, loader = {}, None
    for path in paths:
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            line = line.strip()
            m = re.match(r"(\S+) => (/\S+) \(", line)
            if m:
                libs[m.group(1)] = os.path.realpath(m.group(2))
            elif line.startswith("/") and "ld-linux" in line:
                loader = os.path.realpath(line.split()[0])
    return libs, loader


def copy_file(src, dst, mode=None):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode if mode is not None else (0o755 if os.access(src, os.X_OK) else 0o644))


def gather_python(payload):
    """Debian's python3.11: the interpreter, lib-dynload, and the pure-Python stdlib as
    byte code in two zips: python311.zip (first on the default sys.path) holds what
    the payload's roles import (stdlib_core), python-more.zip the rest. One file
    instead of hundreds matters in the guest, where each file opened is a round trip
    over virtiofs under TCG, and a small first zip too (see ENTRY_SCRIPT). os.py stays
    as a file: it is the landmark Python finds its prefix by."""
    prefix = payload / "python"
    copy_file("/usr/bin/python3.11", prefix / "bin" / "python3", 0o755)
    src = Path("/usr/lib/python3.11")
    lib = prefix / "lib"
    dst = lib / "python3.11"
    sources = []
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        dirnames[:] = sorted(d for d in dirnames if str(rel / d) not in PY_STDLIB_SKIP
                             and d not in ("__pycache__", "test", "tests"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not path.is_file():
                continue
            if name.endswith(".so"):
                copy_file(path, dst / rel / name, 0o644)
            elif name.endswith(".py"):
                sources.append((path, (rel / name).as_posix()))
    copy_file(src / "os.py", dst / "os.py", 0o644)
    core = stdlib_core()

    def in_core(rel):
        module = module_of(rel)
        return module in core or (module.partition(".")[0] in core
                                  and not rel.startswith("encodings/"))
    write_pyc_zip([s for s in sources if in_core(s[1])], lib / "python311.zip")
    write_pyc_zip([s for s in sources if not in_core(s[1])], lib / "python-more.zip")
    return [prefix / "bin" / "python3", *sorted((dst / "lib-dynload").glob("*.so"))]


def stdlib_core():
    """The standard library modules the payload's roles load as they start, as the
    payload's own python3.11 imports them, plus those they import later on their
    usual paths (PAYLOAD_LAZY_IMPORTS). pyroute2's are left to python-more.zip: only
    the entrypoint, on the host's CPU, reads it. A package's submodules are found
    only beside it, so gather_python keeps whole packages together, except the
    codecs, which ENTRY_SCRIPT lets the encodings package find in python-more.zip."""
    script = (f"import sys\nsys.path.insert(1, {str(ROOT)!r})\n"
              + "".join(f"import {name}\n" for name in PAYLOAD_ROLES + PAYLOAD_LAZY_IMPORTS)
              + "print(*sys.modules, sep='\\n')\n")
    out = subprocess.run(["/usr/bin/python3.11", "-I", "-S", "-c", script],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def module_of(rel):
    """`pkg/mod.py` -> `pkg.mod`, `pkg/__init__.py` -> `pkg`."""
    parts = rel[:-len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def write_pyc_zip(sources, zip_path):
    """Byte code only, in the layout zipimport reads (`pkg/mod.pyc`)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, rel in sources:
            code = compile_source(path, rel)
            if code is not None:
                info = zipfile.ZipInfo(rel + "c", FIXED_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, code)


def compile_source(path, rel):
    """Byte code of one module as an unchecked-hash .pyc image, or None if it does not
    compile (a few stdlib files are Python 2 examples)."""
    import importlib._bootstrap_external as ext
    source = path.read_bytes()
    try:
        code = compile(source, rel, "exec", dont_inherit=True, optimize=0)
    except SyntaxError:
        return None
    return bytes(ext._code_to_hash_pyc(code, importlib.util.source_hash(source), checked=False))


def compile_tree(path):
    """Byte-compile with unchecked hashes: the payload is read-only and its mtimes are
    fixed, so a timestamp-checked .pyc would be stale and recompiled on every start."""
    ok = compileall.compile_dir(str(path), quiet=2, workers=1, ddir=None,
                                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    if not ok:
        log(f"note: some files under {path} did not compile (left as source)")


def write_template_initrd(payload):
    """A template's initramfs (paths.TEMPLATE_INITRD, beside each payload kernel, after
    that kernel's own initramfs where it has one): what dkvm-vm-init needs before
    the container's export is there, laid out as the payload is (at /.dkvm): the
    Python with the standard library its roles import first (python311.zip) and the
    extension modules the guest loads (guest_extensions) with their libraries, DKVM's
    code, busybox, and /init. The export's payload is mounted over it once the plan
    comes (same build, same files, the rest of the library among them). Every file
    here is guest RAM in every VM restored from the template: nothing more.
    Uncompressed: unpacked once, when the template is made."""
    from dkvm.boot.initramfs import write_newc
    python = payload / "python"
    extensions = [path for path in (python / "lib" / "python3.11" / "lib-dynload").glob("*.so")
                  if path.name.split(".")[0] in guest_extensions()]
    libs, _ = elf_deps([python / "bin" / "python3", *extensions])
    files = sorted({*(path.relative_to(payload) for path in extensions),
                    *(Path("lib") / soname for soname in libs),
                    Path("python/bin/python3"), Path("python/lib/python311.zip"),
                    Path("python/lib/python3.11/os.py"),
                    Path("lib/ld-linux-x86-64.so.2"), Path("bin/busybox"),
                    Path("dkvm.zip"), Path("entry") / program("vm-init")})
    top = Path(paths.PAYLOAD_MOUNT[1:])
    dirs = {"dev", "proc", "sys", paths.SHARE_DIR[1:], top.as_posix()}
    for rel in files:
        dirs.update((top / parent).as_posix() for parent in rel.parents if parent != Path("."))
    entries = [(d, stat.S_IFDIR | 0o755, None) for d in sorted(dirs)]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, None, (5, 1)))
    for rel in files:
        source = payload / rel
        mode = 0o755 if os.access(source, os.X_OK) else 0o644
        entries.append(((top / rel).as_posix(), stat.S_IFREG | mode, source.read_bytes()))
    entries.append(("init", stat.S_IFREG | 0o755, (ROOT / "guest-init" / "template-init")
                    .read_bytes()))
    template = io.BytesIO()
    write_newc(template, entries)
    for boot_file in (payload / "kernels").glob("*/boot.json"):
        own = json.loads(boot_file.read_text()).get("initrd")
        with open(boot_file.parent / paths.TEMPLATE_INITRD, "wb") as out:
            if own:             # its modules: the kernel unpacks one archive after the other
                out.write((boot_file.parent / own).read_bytes())
            out.write(template.getvalue())


def guest_extensions():
    """The extension modules (lib-dynload) the guest's init loads, as python3.11 loads
    dkvm-vm-init with every guest module and the lazy imports."""
    script = (f"import sys\nsys.path.insert(1, {str(ROOT)!r})\n"
              + "".join(f"import {name}\n" for name in GUEST_MODULES + PAYLOAD_LAZY_IMPORTS)
              + "print(*(name for name, m in sys.modules.items()"
              + " if (getattr(m, '__file__', '') or '').endswith('.so')), sep='\\n')\n")
    out = subprocess.run(["/usr/bin/python3.11", "-I", "-S", "-c", script],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def gather_qemu(payload):
    qdir = payload / "qemu"
    copy_file("/usr/bin/qemu-system-x86_64", qdir / "qemu-system-x86_64", 0o755)
    copy_file("/usr/lib/qemu/virtiofsd", qdir / "virtiofsd", 0o755)
    for fw in QEMU_FIRMWARE:
        copy_file(os.path.realpath(fw), qdir / "firmware" / os.path.basename(fw), 0o644)
    for mod in QEMU_MODULES:
        copy_file(f"/usr/lib/x86_64-linux-gnu/qemu/{mod}", qdir / "modules" / mod, 0o644)
    return [qdir / "qemu-system-x86_64", qdir / "virtiofsd",
            *[qdir / "modules" / m for m in QEMU_MODULES]]


def gather_libs(payload, elfs):
    libs, loader = elf_deps(elfs)
    if not loader:
        raise SystemExit("build: ldd found no dynamic loader")
    for soname, real in sorted(libs.items()):
        copy_file(real, payload / "lib" / soname, 0o755)
    copy_file(loader, payload / "lib" / "ld-linux-x86-64.so.2", 0o755)


def build_site_packages():
    """dkvm and pyroute2, for the payload's zips; and dkvm alone, for shiv's
    site-packages: the host's roles never import pyroute2, and every entry of the
    archive costs the runtime wrapper time (see pack)."""
    site, host_site = BUILD / "site-packages", BUILD / "site-packages-host"
    for tree in (site, host_site):
        if tree.exists():
            shutil.rmtree(tree)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile",
                    "--no-deps", "--target", str(site), PYROUTE2], check=True)
    for tree in (site, host_site):
        shutil.copytree(ROOT / "dkvm", tree / "dkvm",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for junk in site.glob("*.dist-info"):
        shutil.rmtree(junk)  # RECORD files carry install-time detail; not needed at run time
    compile_tree(host_site)
    return site, host_site


def tree_digest(*roots):
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in root.rglob("*")):
            rel = path.relative_to(root.parent).as_posix()
            if path.is_file():
                h.update(b"F%s\0%o\0" % (rel.encode(), path.stat().st_mode & 0o777))
                h.update(hashlib.sha256(path.read_bytes()).digest())
            elif path.is_dir():
                h.update(b"D%s\0" % rel.encode())
    return h.hexdigest()[:16]


def write_payload_tar(zf, payload):
    """The payload as one member (host.payload.PAYLOAD_MEMBER, a tar: it unpacks as a
    stream), its build id as another (PAYLOAD_BUILD_ID). Hundreds of members would
    each cost every run of the archive: Python reads its whole directory to import."""
    import tarfile
    info = zipfile.ZipInfo(PAYLOAD_MEMBER, FIXED_ZIP_TIME)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w") as dst, tarfile.open(fileobj=dst, mode="w|",
                                                   format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(payload.rglob("*")):
            member = tar.gettarinfo(str(path), path.relative_to(payload).as_posix())
            member.uid = member.gid = 0
            member.uname = member.gname = ""
            member.mtime = 0
            if path.is_file():
                with open(path, "rb") as src:
                    tar.addfile(member, src)
            else:
                tar.addfile(member)
    info = zipfile.ZipInfo(PAYLOAD_BUILD_ID, FIXED_ZIP_TIME)
    info.external_attr = 0o644 << 16
    zf.writestr(info, (payload / "BUILD_ID").read_bytes())


def pack(shiv_archive, out, site, payload):
    """The final archive: PREAMBLE, shiv's archive, each dkvm module's byte code beside
    it (`mod.pyc`: the layout zipimport reads), and the payload."""
    with open(out, "wb") as f:
        f.write(PREAMBLE.encode())
        with zipfile.ZipFile(shiv_archive) as src, zipfile.ZipFile(f, "w") as dst:
            for info in src.infolist():
                dst.writestr(info, src.read(info))
            for path in sorted((site / "dkvm").rglob("*.py")):
                rel = path.relative_to(site).as_posix()
                code = compile_source(path, rel)
                if code is not None:
                    info = zipfile.ZipInfo(f"site-packages/{rel}c", FIXED_ZIP_TIME)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    dst.writestr(info, code)
            write_payload_tar(dst, payload)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=str(DIST / "dkvm.pyz"))
    args = parser.parse_args()

    ensure_packages()
    payload = BUILD / "payload"
    if payload.exists():
        shutil.rmtree(payload)
    payload.mkdir(parents=True)
    log("gathering python, qemu, virtiofsd, busybox")
    elfs = gather_python(payload) + gather_qemu(payload)
    copy_file("/bin/busybox", payload / "bin" / "busybox", 0o755)
    copy_file("/sbin/mke2fs", payload / "bin" / "mke2fs", 0o755)     # DKVM_DISKS
    elfs.append(payload / "bin" / "mke2fs")
    # the guest kernel's module loader where the image has none (a script, not a
    # symlink: the payload travels in a zip)
    (payload / "bin" / "modprobe").write_text(
        '#!/.dkvm/bin/busybox sh\nexec /.dkvm/bin/busybox modprobe "$@"\n')
    (payload / "bin" / "modprobe").chmod(0o755)
    gather_libs(payload, elfs)
    for role in ROLE_ENTRIES:
        (payload / "entry").mkdir(exist_ok=True)
        (payload / "entry" / role).write_text(ENTRY_SCRIPT)
    guest_init = payload / paths.GUEST_INIT_DIR
    copy_file(ROOT / "guest-init" / "init", guest_init / "init", 0o755)
    (guest_init / "root").mkdir()       # a direct boot's mount point for init's own root
    log("building the guest kernels")
    build_kernels(payload, BUILD, apt_install, busybox=Path("/bin/busybox").read_bytes(),
                  init=(ROOT / "guest-init" / "init").read_bytes())
    site, host_site = build_site_packages()
    site_sources = [(p, p.relative_to(site).as_posix()) for p in sorted(site.rglob("*.py"))]
    write_pyc_zip([s for s in site_sources if s[1].startswith("dkvm/")], payload / "dkvm.zip")
    write_pyc_zip([s for s in site_sources if not s[1].startswith("dkvm/")],
                  payload / "site-packages.zip")
    write_template_initrd(payload)
    build_id = tree_digest(payload, site)
    (payload / "BUILD_ID").write_text(build_id + "\n")

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    log(f"packing {out} (build id {build_id})")
    subprocess.run([sys.executable, "-m", "shiv", "--reproducible", "--no-modify",
                    "-p", "/usr/bin/python3 -IS", "-e", "dkvm.__main__:main",
                    "--site-packages", str(host_site), "--build-id", build_id,
                    "-o", str(tmp)], check=True, stdout=subprocess.DEVNULL)
    final = out.with_suffix(".tmp2")
    pack(tmp, final, host_site, payload)
    tmp.unlink()
    os.chmod(final, 0o755)
    os.replace(final, out)
    log(f"done: {out} ({out.stat().st_size >> 20} MiB)")


if __name__ == "__main__":
    main()
