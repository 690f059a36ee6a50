"""The taps (container/net/taps.py), made with ioctls before pyroute2 is imported: in a
network namespace of their own, against the real kernel."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from dkvm.container.net.taps import ARPHRD_ETHER, NO_MAC, is_guest_nic, tap_name
from unitutil import REPO

IN_NAMESPACE = """
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from dkvm.container.net.taps import create_tap, guest_nics, tap_name
subprocess.run(["ip", "link", "add", "eth0", "address", "02:42:ac:11:00:02", "mtu", "1400",
                "type", "veth", "peer", "name", "eth1", "address", "02:42:ac:11:00:03"],
               check=True)
subprocess.run(["ip", "link", "add", "tunnelish", "type", "ipip", "remote", "192.0.2.1"])
before = [nic.as_dict() for nic in guest_nics()]
index = create_tap(tap_name(0), 1400)
with open(f"/sys/class/net/{tap_name(0)}/mtu") as f:
    mtu = int(f.read())
with open(f"/sys/class/net/{tap_name(0)}/flags") as f:
    up = bool(int(f.read(), 16) & 1)
with open(f"/sys/class/net/{tap_name(0)}/owner") as f:
    owner = int(f.read())
print(json.dumps({"before": before, "after": [nic.name for nic in guest_nics()],
                  "tap": [index > 0, mtu, up, owner]}))
"""


@pytest.mark.skipif(not shutil.which("unshare") or not shutil.which("ip")
                    or not os.path.exists("/dev/net/tun"), reason="needs unshare, ip and a tun")
def test_the_guests_nics_are_the_namespaces_ethernet_links_and_their_taps_come_up():
    out = subprocess.run(["unshare", "-rnm", "sh", "-c",      # sysfs shows the new namespace
                          'mount -t sysfs sysfs /sys && exec "$@"', "-", sys.executable, "-c",
                          IN_NAMESPACE, str(REPO)], capture_output=True, text=True, timeout=60)
    if out.returncode and "Operation not permitted" in out.stderr:
        pytest.skip("no user namespaces here")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {nic["name"]: (nic["mac"], nic["mtu"]) for nic in result["before"]} == {
        "eth0": ("02:42:ac:11:00:02", 1400), "eth1": ("02:42:ac:11:00:03", 1500)}
    indexes = [nic["index"] for nic in result["before"]]
    assert indexes == sorted(indexes)               # the order the taps are numbered in
    assert sorted(result["after"]) == ["eth0", "eth1"]     # no tap, no lo, no tunnel
    assert result["tap"] == [True, 1400, True, 0]


@pytest.mark.parametrize("name, link_type, mac, nic", [
    ("eth0", ARPHRD_ETHER, "02:42:ac:11:00:02", True),
    ("gretap0", ARPHRD_ETHER, NO_MAC, False),       # ip_gre's, in every namespace
    ("erspan0", ARPHRD_ETHER, NO_MAC, False),
    ("gre0", 778, "00:00:00:00", False),             # ARPHRD_IPGRE
    ("lo", 772, NO_MAC, False),
    (tap_name(0), ARPHRD_ETHER, "02:42:ac:11:00:09", False),
])
def test_a_nic_is_an_ethernet_link_with_an_address(name, link_type, mac, nic):
    """A host with ip_gre loaded gives each new namespace gretap0 and erspan0 (loading a
    module cannot be done here, so this is their description): under runc they stay
    down in the container; a VM gets no NIC for them."""
    assert is_guest_nic(name, link_type, mac) is nic
