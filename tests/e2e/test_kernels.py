"""Guest kernels: every kernel the build carries (kernels/*/recipe.toml) passes what
depends on the kernel (its release, the devices DKVM gives it, modules, disks, the
network), and the image's own kernel boots with the image's own modules."""
import os
import subprocess
import urllib.request
import uuid

import pytest

from dockerutil import (KERNELS, PATH_ENV, busybox_tree, dkvm_lines, docker_import,
                        docker_run, sh)
from waiting import poll

pytestmark = pytest.mark.slow

BOOTED = 240


def kernel_env(kernel):
    return ["-e", f"DKVM_KERNEL={kernel}"]


@pytest.fixture(scope="session")
def listed(docker):
    """`dkvm kernels`: name (the default marked `*`) -> the rest of its row (release,
    boot, source)."""
    rows = {}
    for line in sh("dkvm", "kernels").stdout.splitlines()[1:]:
        cells = line.split(None, 1)
        if len(cells) == 2 and not line.startswith("*"):
            rows[cells[0]] = cells[1]
    return rows


def release_of(listed, kernel):
    return listed.get(kernel, listed.get(kernel + "*", "")).split()[0]


def test_dkvm_kernels_lists_each_recipe_and_the_images_own(listed):
    names = [name.rstrip("*") for name in listed]
    assert names == KERNELS + ["image"]
    assert [name for name in listed if name.endswith("*")] == ["dkvm*"]
    assert "the export as root" in listed["dkvm*"] and "linux-source" in listed["dkvm*"]
    assert "initramfs" in listed["debian"] and "linux-image" in listed["debian"]


def test_an_unknown_kernel_fails_at_create_naming_what_exists(busybox_image, listed):
    out = docker_run("dkvm", "-e", "DKVM_KERNEL=dkvm/9.9", busybox_image, "true")
    assert out.returncode == 125
    (line,) = dkvm_lines(out.stderr)
    for kernel in KERNELS:
        assert f"{kernel}/{release_of(listed, kernel)}" in line
    assert "image" in line


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_kernel_boots_its_release_with_stdio_exit_code_and_exec(kernel, busybox_image,
                                                                   listed, container_name):
    release = release_of(listed, kernel)
    out = docker_run("dkvm", "-i", *kernel_env(kernel), busybox_image, "sh", "-c",
                     "uname -r; cat; echo err >&2; exit 7", input="from stdin\n")
    assert (out.returncode, out.stdout, out.stderr) == (7, f"{release}\nfrom stdin\n", "err\n")
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, *kernel_env(kernel),
       busybox_image, "sleep", "600")
    assert sh("docker", "exec", container_name, "uname", "-r", timeout=BOOTED).stdout == \
        release + "\n"
    sh("docker", "stop", "-t", "1", container_name, timeout=60)


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_kernel_loads_modules_by_name_and_on_its_own_request(kernel, busybox_image):
    """`modprobe` by name (macvlan), and the kernel's own request when a link of a kind
    it lacks is made (dummy: `rtnl-link-dummy`), from the modules this kernel carries;
    both are modules in every kernel DKVM builds."""
    script = ("modprobe macvlan && grep -o '^macvlan' /proc/modules && "
              "ip link add d0 type dummy && grep -o '^dummy' /proc/modules")
    out = docker_run("dkvm", "-e", "DKVM_KERNEL_MOUNT_LIB_MODULES=1", *kernel_env(kernel),
                     busybox_image, "sh", "-c", script)
    assert (out.returncode, out.stdout) == (0, "macvlan\ndummy\n"), out.stderr


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_kernel_mounts_a_disk_and_reaches_the_network(kernel, busybox_image,
                                                        container_name):
    sh("docker", "run", "-d", "--runtime=dkvm", "--name", container_name, *kernel_env(kernel),
       "-e", "DKVM_DISKS=/d.img,/data,ext4,64m", "-p", "127.0.0.1:18081:8080",
       busybox_image, "sh", "-c",
       "grep ' /data ' /proc/mounts | cut -d' ' -f3 > /data/fs && mkdir -p /www && "
       "cp /data/fs /www/index.html && exec httpd -f -p 8080 -h /www")

    def fetch():
        try:
            with urllib.request.urlopen("http://127.0.0.1:18081/", timeout=5) as resp:
                return resp.read().decode()
        except OSError as err:
            return repr(err)
    assert poll(fetch, lambda got: got == "ext4\n", BOOTED, 1) == "ext4\n"


# --- the image's own kernel ----------------------------------------------------------

def image_releases(image):
    """The kernels the image carries ({release}), and the one /vmlinuz points to, as
    runc shows them."""
    out = sh("docker", "run", "--rm", "--runtime=runc", image, "sh", "-c",
             "ls /boot; readlink /vmlinuz").stdout.split()
    releases = {name[len("vmlinuz-"):] for name in out if name.startswith("vmlinuz-")}
    return releases, out[-1].rsplit("vmlinuz-", 1)[1]


def test_the_images_own_kernel_boots_with_the_images_own_modules(kernel_image, listed,
                                                                 operator_allows):
    operator_allows("DKVM_KERNEL=image")
    releases, default = image_releases(kernel_image)
    (cloud,) = [release for release in releases if "cloud" in release]
    # vfat is a module of Debian's kernels that the payload does not carry: only the
    # image's own /lib/modules has it
    probe = "uname -r; modprobe vfat && grep -o '^vfat' /proc/modules; cat /proc/1/comm"
    out = docker_run("dkvm", "-e", "DKVM_KERNEL=image", kernel_image, "sh", "-c", probe)
    assert (out.returncode, out.stdout) == (0, f"{default}\nvfat\nsh\n"), out.stderr
    out = docker_run("dkvm", "-e", f"DKVM_KERNEL=image/{cloud}", kernel_image, "uname", "-r")
    assert (out.returncode, out.stdout) == (0, cloud + "\n"), out.stderr
    assert cloud not in [release_of(listed, kernel) for kernel in KERNELS]
    out = docker_run("dkvm", "-e", "DKVM_KERNEL=debian", kernel_image, "sh", "-c",
                     "modprobe vfat 2>/dev/null || echo not carried")
    assert out.stdout == "not carried\n"


def test_an_image_kernel_that_is_not_there_fails_at_create_with_one_line(kernel_image,
                                                                        busybox_image,
                                                                        operator_allows):
    operator_allows("DKVM_KERNEL=image")
    out = docker_run("dkvm", "-e", "DKVM_KERNEL=image", busybox_image, "true")
    assert out.returncode == 125
    (line,) = dkvm_lines(out.stderr)
    assert "DKVM_KERNEL=image: the image has no kernel" in line
    out = docker_run("dkvm", "-e", "DKVM_KERNEL=image/9.9.9", kernel_image, "true")
    assert out.returncode == 125
    (line,) = dkvm_lines(out.stderr)
    assert "DKVM_KERNEL=image/9.9.9: the image has no such kernel; it has" in line


def test_an_images_kernel_link_cannot_reach_a_kernel_on_the_host(kernel_image, tmp_path,
                                                                  operator_allows):
    """A hostile image whose /vmlinuz and /boot/vmlinuz point at a real kernel on the
    host (absolutely, and up and out with ..): both resolve inside the image, where
    nothing is, so create refuses; the host's file is never read."""
    operator_allows("DKVM_KERNEL=image")
    host_kernel = tmp_path / "vmlinuz-on-the-host"
    with open(host_kernel, "wb") as f:
        subprocess.run(["docker", "run", "--rm", "--runtime=runc", kernel_image, "cat",
                        "/vmlinuz"], stdout=f, check=True, timeout=120)
    root = tmp_path / "root"
    busybox_tree(root)
    (root / "boot").mkdir()
    os.symlink(str(host_kernel), root / "vmlinuz")
    os.symlink("../../../../../../.." + str(host_kernel), root / "boot" / "vmlinuz")
    tag = f"dkvm-test-kernel-link-{uuid.uuid4().hex[:8]}"
    docker_import(root, tag, [PATH_ENV])
    try:
        out = docker_run("dkvm", "-e", "DKVM_KERNEL=image", tag, "true")
    finally:
        sh("docker", "rmi", "-f", tag, check=False)
    assert out.returncode == 125
    (line,) = dkvm_lines(out.stderr)
    assert "DKVM_KERNEL=image: the image has no kernel" in line


def test_dockers_own_check_finds_what_docker_needs_in_dkvms_kernel(system_image):
    """Docker's contrib/check-config.sh, run in the VM on the fast kernel's own
    /proc/config.gz: nothing missing but what the recipe's fragment says it leaves out
    (and what the script asks of kernels older than 6.1)."""
    out = docker_run("dkvm", "-e", "DKVM_KERNEL=dkvm", system_image, "sh", "-c",
                     "bash /usr/share/docker.io/contrib/check-config.sh /proc/config.gz "
                     "| sed 's/\\x1b\\[[0-9;]*m//g' | grep missing")
    missing = {line.split(":")[0].strip(" -") for line in out.stdout.splitlines()}
    assert "CONFIG_NAMESPACES" not in missing and out.stdout, out.stderr
    assert missing <= {"CONFIG_MEMCG_SWAP", "CONFIG_RT_GROUP_SCHED", "CONFIG_AUFS_FS",
                       "/dev/zfs", "zfs command", "zpool command"}, missing
