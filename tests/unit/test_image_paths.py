"""Mount destinations resolved inside the image as runc resolves them in a container
whose root is the image: on real trees, links of every kind."""
import os
import stat

import pytest

from unitutil import OpenWatch
from dkvm.errors import DkvmError
from dkvm.host.image_paths import make_mount_point, real_destination


@pytest.fixture
def image(tmp_path):
    root = tmp_path / "rootfs"
    for d in ("etc", "usr/lib", "srv/app", "run/systemd"):
        (root / d).mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")                    # usrmerge: relative
    (root / "etc" / "resolv.conf").symlink_to("../run/systemd/resolv.conf")
    (root / "escape").symlink_to("/../../../../etc")        # `..` stops at the root
    (root / "abs").symlink_to("/srv/app")
    (root / "loop").symlink_to("loop")
    (root / "dkvm").symlink_to("/.dkvm/lib")                # a hostile image's aim
    return root


@pytest.mark.parametrize("destination,real", [
    ("/srv/app/data", "/srv/app/data"),                     # no link: as written
    ("/lib/modules", "/usr/lib/modules"),
    ("/etc/resolv.conf", "/run/systemd/resolv.conf"),
    ("/escape/hosts", "/etc/hosts"),
    ("/abs/x", "/srv/app/x"),
    ("/srv/../etc/./hosts", "/etc/hosts"),
    ("/../../etc", "/etc"),
    ("/dkvm", "/.dkvm/lib"),                                # inside the image, prefixed later
    ("/new/dir", "/new/dir"),                               # runc creates it
])
def test_links_resolve_inside_the_image(image, destination, real):
    assert real_destination(str(image), destination) == real


def test_a_loop_of_links_is_an_error(image):
    with pytest.raises(DkvmError, match="/loop/x: too many symbolic links"):
        real_destination(str(image), "/loop/x")


def test_mount_points_are_made_where_they_resolve(image, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    binds = [("/data", str(volume))]
    make_mount_point(str(image), binds, "/srv/app/new/dir")
    make_mount_point(str(image), binds, "/etc/hosts", directory=False)
    make_mount_point(str(image), binds, "/data/sub")
    assert (image / "srv/app/new/dir").is_dir() and (image / "etc/hosts").is_file()
    assert (volume / "sub").is_dir() and not (image / "data").exists()
    make_mount_point(str(image), binds, "/srv/app/new/dir")            # again: nothing to do


def test_a_link_that_appears_since_is_not_followed(image, tmp_path):
    """Resolved once, then a peer sharing the volume swaps a directory for a link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "sub").symlink_to(outside)
    with pytest.raises(DkvmError, match="cannot make the mount point /data/sub/x"):
        make_mount_point(str(image), [("/data", str(volume))], "/data/sub/x")
    assert list(outside.iterdir()) == []


def test_a_path_through_an_earlier_bind_mount_resolves_in_its_source(image, tmp_path):
    """`-v vol:/data -v other:/data/sub`: /data/sub is in the volume, whose links the
    guest may have made."""
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "sub").symlink_to("/etc")
    (volume / "rel").symlink_to("../srv")
    binds = [("/data", str(volume))]
    assert real_destination(str(image), "/data/sub", binds) == "/etc"
    assert real_destination(str(image), "/data/rel/app", binds) == "/srv/app"
    assert real_destination(str(image), "/data/plain", binds) == "/data/plain"
    # the longest earlier destination wins
    inner = tmp_path / "inner"
    (inner / "x").mkdir(parents=True)
    os.symlink("/usr", inner / "y")
    binds.append(("/data/sub2", str(inner)))
    assert real_destination(str(image), "/data/sub2/y/lib", binds) == "/usr/lib"


@pytest.fixture
def image_nodes(image):
    """An image whose file-bind destinations hold a FIFO and a device node (/dev/null's
    numbers: opening it would be harmless, but is seen), each with a reader ready so
    that an open for writing would return, not hang, and be seen."""
    os.makedirs(image / "sbin")
    os.mkfifo(image / "sbin/docker-init")
    os.mknod(image / "etc/device", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    reader = os.open(image / "sbin/docker-init", os.O_RDONLY | os.O_NONBLOCK)
    yield image
    os.close(reader)


@pytest.mark.parametrize("path", ["/sbin/docker-init", "/etc/device"])
@pytest.mark.parametrize("directory", [False, True])
def test_a_node_where_a_mount_point_goes_is_left_unopened(image_nodes, path, directory):
    before = os.lstat(f"{image_nodes}{path}")
    with OpenWatch(f"{image_nodes}{path}") as watch:
        make_mount_point(str(image_nodes), [], path, directory=directory)
        assert not watch.opened()
    after = os.lstat(f"{image_nodes}{path}")
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino,
                                                            before.st_rdev)


def test_a_file_mount_point_is_made_empty_and_an_existing_file_untouched(image):
    make_mount_point(str(image), [], "/etc/new-file", directory=False)
    made = os.lstat(image / "etc/new-file")
    assert stat.S_ISREG(made.st_mode) and made.st_size == 0
    assert stat.S_IMODE(made.st_mode) == 0o644 & ~current_umask()
    (image / "etc/kept").write_text("data")
    with OpenWatch(image / "etc/kept") as watch:
        make_mount_point(str(image), [], "/etc/kept", directory=False)
        assert not watch.opened()
    assert (image / "etc/kept").read_text() == "data"


@pytest.mark.parametrize("directory", [False, True])
def test_a_link_that_appears_at_the_mount_point_itself_is_refused(image, tmp_path, directory):
    outside = tmp_path / "outside"
    outside.mkdir()
    (image / "srv/app/point").symlink_to(outside / "target")
    with pytest.raises(DkvmError, match="mount point /srv/app/point in the image: point: "
                                        "a symbolic link"):
        make_mount_point(str(image), [], "/srv/app/point", directory=directory)
    assert list(outside.iterdir()) == []


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("target,real", [(b"\xff", None), (b"/srv/\xfe\xff", None),
                                         (b"\xff/../srv", "/srv/x")])
def test_a_link_to_a_name_that_is_not_utf8_fails_naming_the_destination(image, target, real):
    """JSON for runc is UTF-8: runc would read the name as U+FFFD and mount at a path of
    its own making. Only a destination that really ends there fails."""
    os.symlink(target, os.path.join(os.fsencode(image), b"dir"))
    if real:
        assert real_destination(str(image), "/dir/x") == real
        return
    shown = (b"/" + target.lstrip(b"/")).decode("utf-8", "backslashreplace")
    with pytest.raises(DkvmError) as err:
        real_destination(str(image), "/dir/x")
    assert str(err.value) == (f"mount destination /dir/x: the image's links lead it to "
                              f"{shown}/x, a name that is not UTF-8, which DKVM cannot give "
                              "runc (an OCI config is UTF-8)")


def test_a_mount_point_that_cannot_be_made_is_one_line(image):
    long_name = "n" * 300
    for directory in (True, False):
        with pytest.raises(DkvmError, match=f"mount point /srv/{long_name} in the image: "
                                            f"{long_name}: File name too long"):
            make_mount_point(str(image), [], f"/srv/{long_name}", directory=directory)
