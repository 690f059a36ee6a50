"""Mount destinations resolved inside the image as runc resolves them in a container
whose root is the image: on real trees, links of every kind."""
import os

import pytest

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
