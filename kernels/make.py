"""Build the guest kernels that kernels/*/recipe.toml describe, for build.py.

Two stages. Compiling (or extracting) a kernel gives its ELF, its release and its
modules tree; that is cached under build/kernels/<name>-<key>, the key a hash of the
recipe's files and the source package's version, so a second build reuses it.
Assembling copies it into the payload's kernels/<name> with its boot descriptor
(schema.Boot) and, where the recipe boots through one, the initramfs (built fresh:
it holds DKVM's /init and busybox, which change with the tree)."""
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from dkvm.errors import DkvmError
from dkvm.boot.image_kernel import boot_initramfs
from dkvm.boot.initramfs import BOOT_MODULES, load_order, modinfo_depends, module_name
from dkvm.paths import STATIC_NODES
from dkvm.schema import Boot

KERNELS = Path(__file__).resolve().parent
SOURCE_KINDS = ("debian-image", "debian-source")
KERNEL_SOURCE_TARBALL = "/usr/src/{package}.tar.xz"


def log(msg):
    print(f"build: {msg}", flush=True, file=sys.stderr)


def recipes():
    """name -> recipe (the parsed TOML, checked), for every kernels/<name>/recipe.toml."""
    found = {}
    for path in sorted(KERNELS.glob("*/recipe.toml")):
        recipe = tomllib.loads(path.read_text())
        kind = recipe.get("source", {}).get("kind")
        if kind not in SOURCE_KINDS:
            raise SystemExit(f"build: {path}: source.kind must be one of {', '.join(SOURCE_KINDS)}")
        if "description" not in recipe or "package" not in recipe["source"]:
            raise SystemExit(f"build: {path}: needs description and source.package")
        recipe["dir"] = path.parent
        found[path.parent.name] = recipe
    return found


def build_kernels(payload, build, apt_install, busybox, init):
    """Every recipe's kernel into payload/kernels/<name>."""
    for name, recipe in recipes().items():
        compiled = compile_kernel(name, recipe, build, apt_install)
        assemble(name, recipe, compiled, payload / "kernels" / name, busybox, init)


def compile_kernel(name, recipe, build, apt_install):
    """The cached stage: build/kernels/<name>-<key> with vmlinux, lib/modules/<release>,
    and `release` and `source` (one line each)."""
    source = recipe["source"]
    if source["kind"] == "debian-image":
        deb = download_deb(resolve_meta_package(source["package"]), build / "debs")
        version = deb.name
    else:
        apt_install([source["package"], *source.get("build_packages", [])])
        version = installed_version(source["package"])
    key = hashlib.sha256()
    for path in sorted(p for p in recipe["dir"].iterdir() if p.is_file()):
        key.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    key.update(version.encode())
    out = build / "kernels" / f"{name}-{key.hexdigest()[:16]}"
    if (out / "release").exists():
        log(f"kernel {name}: cached in {out.relative_to(build.parent)}")
        return out
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if source["kind"] == "debian-image":
        release = extract_debian_kernel(deb, recipe, tmp, build)
        described = f"Debian package {deb.name.split('_')[0]} {deb.name.split('_')[1]}"
    else:
        release = compile_debian_source(name, recipe, version, tmp, build)
        described = (f"Debian {source['package']} {version}, {source['base']} + "
                     f"kernels/{name}/{source['fragment']}")
    (tmp / "release").write_text(release + "\n")
    (tmp / "source").write_text(described + "\n")
    for old in (build / "kernels").glob(f"{name}-*"):
        if old != tmp:
            shutil.rmtree(old)              # an older recipe's: one cached build per kernel
    tmp.rename(out)
    return out


def assemble(name, recipe, compiled, kdir, busybox, init):
    """payload/kernels/<name>: the ELF, the modules, the initramfs if it boots through
    one, and boot.json (paths relative to the folder)."""
    release = (compiled / "release").read_text().strip()
    kdir.mkdir(parents=True)
    shutil.copyfile(compiled / "vmlinux", kdir / "vmlinux")
    shutil.copytree(compiled / "lib", kdir / "lib", symlinks=False)
    rename_static_nodes(kdir / "lib" / "modules" / release)
    initrd = ""
    if recipe["boot"]["initramfs"]:
        initrd = "initrd.img"
        try:
            image = boot_initramfs(str(compiled), release, busybox, init)
        except DkvmError as err:
            raise SystemExit(f"build: kernel {name}: {err}") from None
        (kdir / initrd).write_bytes(image)
    boot = Boot(name=name, release=release, kernel="vmlinux", initrd=initrd,
                modules="lib/modules", source=(compiled / "source").read_text().strip())
    (kdir / "boot.json").write_text(boot.to_json() + "\n")


def rename_static_nodes(modules):
    """The guest's init makes the device nodes depmod lists in modules.devname; the
    workload sees the same tree at /lib/modules/<release>, where systemd would have
    kmod make them (and fail without kmod): under runc there is no such file."""
    devname = modules / "modules.devname"
    if devname.exists():
        devname.rename(modules / STATIC_NODES)


# --- Debian's stock kernel -----------------------------------------------------------

def resolve_meta_package(meta):
    out = subprocess.run(["apt-cache", "depends", meta], check=True,
                         capture_output=True, text=True).stdout
    names = re.findall(r"Depends: (linux-image-\S+)", out)
    if not names:
        raise SystemExit(f"build: apt-cache knows no kernel for {meta}; run apt-get update")
    return names[0]


def download_deb(package, cache):
    """Download (not install) a package: the build machine's own kernel is untouched."""
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if not debs:
        log(f"downloading {package}")
        subprocess.run(["apt-get", "download", package], cwd=cache, check=True)
        debs = sorted(cache.glob(f"{package}_*.deb"))
    return debs[-1]


def extract_debian_kernel(deb, recipe, out, build):
    tree = build / "kernel-deb"
    if tree.exists():
        shutil.rmtree(tree)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
    release = vmlinuz.name[len("vmlinuz-"):]
    (out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
    copy_module_subset(tree / "lib" / "modules" / release, out, release, recipe["modules"])
    shutil.rmtree(tree)
    return release


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside Debian's xz bzImage, for QEMU's PVH entry."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise SystemExit("build: kernel image is not xz-compressed; cannot extract its ELF")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    if not elf.startswith(b"\x7fELF"):
        raise SystemExit("build: extracted kernel is not an ELF file")
    return elf


def copy_module_subset(moddir, out, release, spec):
    """The recipe's modules (whole directories and single names), the boot modules,
    and what they depend on, with depmod's indexes."""
    paths = {module_name(p.name): p for p in moddir.rglob("*.ko")}
    wanted = set(spec.get("names", [])) | set(BOOT_MODULES)
    for sub in spec.get("dirs", []):
        wanted |= {module_name(p.name) for p in (moddir / "kernel" / sub).rglob("*.ko")}

    def depends_of(name):
        return modinfo_depends(paths[name].read_bytes())
    try:
        order = load_order(sorted(wanted), depends_of)
    except DkvmError as err:
        raise SystemExit(f"build: {err}") from None
    target = out / "lib" / "modules" / release
    for name in order:
        rel = paths[name].relative_to(moddir)
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[name], target / rel)
    for index in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        shutil.copyfile(moddir / index, target / index)
    subprocess.run(["/sbin/depmod", "-b", str(out), release], check=True)


# --- a kernel compiled from Debian's source ------------------------------------------

def installed_version(package):
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], check=True,
                          capture_output=True, text=True).stdout.strip()


def compile_debian_source(name, recipe, version, out, build):
    """make <base> + the fragment (every line of which must hold after olddefconfig),
    then vmlinux and the modules, out of tree; the object tree is kept, so a changed
    fragment rebuilds only what it touches."""
    source = recipe["source"]
    src = build / "kernel-src" / f"{source['package']}-{version}"
    if not (src / "Makefile").exists():
        log(f"unpacking {source['package']} {version}")
        if src.parent.exists():
            shutil.rmtree(src.parent)
        src.parent.mkdir(parents=True)
        tarball = KERNEL_SOURCE_TARBALL.format(package=source["package"])
        subprocess.run(["tar", "-xf", tarball, "-C", str(src.parent)], check=True)
        (src.parent / source["package"]).rename(src)
    obj = build / "kernels" / f"obj-{name}"
    obj.mkdir(parents=True, exist_ok=True)
    fragment = recipe["dir"] / source["fragment"]
    jobs = str((os.cpu_count() or 1) + 1)

    def make(*targets, **kw):
        return subprocess.run(["make", "-s", "-C", str(src), f"O={obj}", f"-j{jobs}",
                               *targets], check=True, **kw)
    make(source["base"], stdout=subprocess.DEVNULL)
    subprocess.run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(obj),
                    str(obj / ".config"), str(fragment)], check=True, stdout=subprocess.DEVNULL)
    make("olddefconfig", stdout=subprocess.DEVNULL)
    lost = config_lost(fragment.read_text(), (obj / ".config").read_text())
    if lost:
        raise SystemExit(f"build: kernel {name}: these lines of {fragment.name} do not hold "
                         f"after olddefconfig (a missing dependency?): {', '.join(lost)}")
    log(f"compiling kernel {name} from {source['package']} {version} (minutes)")
    make("vmlinux", "modules")
    release = make("kernelrelease", capture_output=True, text=True).stdout.strip()
    make("modules_install", f"INSTALL_MOD_PATH={out}", "INSTALL_MOD_STRIP=1",
         "DEPMOD=/sbin/depmod", stdout=subprocess.DEVNULL)
    for link in ("build", "source"):        # into the build tree: not for the payload
        (out / "lib" / "modules" / release / link).unlink(missing_ok=True)
    subprocess.run(["strip", "--strip-debug", "-o", str(out / "vmlinux"), str(obj / "vmlinux")],
                   check=True)
    return release


def config_lost(fragment, config):
    """The fragment's CONFIG_ lines that the final .config does not have as written."""
    have = dict(re.findall(r"^(CONFIG_\w+)=(.*)$", config, re.M))
    lost = []
    for option, value in re.findall(r"^(CONFIG_\w+)=(.*)$", fragment, re.M):
        if have.get(option, "n") != value:
            lost.append(f"{option}={value}")
    return lost
