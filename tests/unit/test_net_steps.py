"""An integration test of container/net/steps.py and guest/network.py: a step means
something only when the other side runs it. The guest's network steps: encoded on the
container side with pyroute2, patched and sent by the guest without it. Checked by
decoding them with pyroute2, and by running them against a real kernel in a fresh
network namespace."""
import json
import os
import shutil
import subprocess
import sys
from socket import AF_INET, AF_INET6

import pytest

from dkvm.container.net.steps import interface_steps, route_step
from dkvm.container.net.pyroute2_light import light_pyroute2
from dkvm.errors import DkvmError
from dkvm.guest import network
from dkvm.schema import Address, Interface, NetChange, Route, plain
from unitutil import REPO

ETH0 = Interface(name="eth0", index=7, mac="02:42:AC:11:00:02", mtu=1400, ipv6=True,
                 addresses=[Address(family=AF_INET, address="172.17.0.2", prefixlen=16,
                                    broadcast="172.17.255.255"),
                            Address(family=AF_INET6, address="fd00::2", prefixlen=64)],
                 routes=[Route(family=AF_INET, gateway="172.17.0.1"),
                         Route(family=AF_INET, dst="10.9.0.0", dst_len=24, metric=50)])


def interface(**changes):
    return Interface.from_dict(plain({**ETH0.as_dict(), **changes}))


def decode(step, index, seq=1):
    """The request as the guest sends it, decoded by pyroute2."""
    light_pyroute2()
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg
    request = bytearray.fromhex(step.netlink)
    network.set_index(request, step.kind, index)
    msg = {"link": ifinfmsg, "addr": ifaddrmsg, "route": rtmsg}[step.kind](bytes(request))
    msg.decode()
    return msg


def test_steps_rename_through_temporary_names_then_configure_then_route():
    steps = interface_steps([ETH0, interface(name="eth1", mac="02:42:0a:00:00:09",
                                             addresses=[], routes=[])])
    whats = [step.what or step.sysctl or {"running": step.name, "ipv6": step.ipv6}
             for step in steps]
    assert whats == [
        "rename (eth0)", "rename (eth1)",
        "rename to eth0 (eth0)", {"net.ipv6.conf.eth0.disable_ipv6": "0"}, "set eth0 up (eth0)",
        "address 172.17.0.2/16 on eth0", "address fd00::2/64 on eth0",
        "rename to eth1 (eth1)", {"net.ipv6.conf.eth1.disable_ipv6": "0"}, "set eth1 up (eth1)",
        "route default via 172.17.0.1", "route 10.9.0.0/24",
        {"running": "eth0", "ipv6": True}, {"running": "eth1", "ipv6": True}]
    assert {step.mac for step in steps if step.mac} == {"02:42:ac:11:00:02",
                                                       "02:42:0a:00:00:09"}
    assert not any(step.optional for step in steps)


def test_requests_get_the_guests_index_where_the_kernel_reads_it():
    steps = interface_steps([ETH0])
    rename = decode(steps[1], index=3)
    assert rename["index"] == 3 and rename.get_attr("IFLA_IFNAME") == "eth0"
    assert rename.get_attr("IFLA_MTU") == 1400
    address = decode(steps[4], index=3)
    assert (address["index"], address["prefixlen"]) == (3, 16)
    assert address.get_attr("IFA_BROADCAST") == "172.17.255.255"
    route = decode(steps[-2], index=3)
    assert route.get_attr("RTA_OIF") == 3 and route.get_attr("RTA_DST") == "10.9.0.0"
    assert route.get_attr("RTA_PRIORITY") == 50


def test_a_removed_route_tolerates_being_gone_already():
    step = route_step("02:42:AC:11:00:02", ETH0.routes[0], add=False, optional=True)
    assert (step.what, step.ignore, step.optional) == (
        "removing route default via 172.17.0.1", [3], True)
    assert decode(step, index=5)["header"]["type"] == 25         # RTM_DELROUTE


def test_a_step_for_a_missing_nic_fails_unless_optional(monkeypatch):
    monkeypatch.setattr(network, "links_by_mac", lambda: {})
    optional = route_step("02:00:00:00:00:01", ETH0.routes[0], add=False, optional=True)
    network.run_steps([optional])
    with pytest.raises(DkvmError, match="no guest NIC with MAC 02:42:ac:11:00:02 for rename"):
        network.run_steps(interface_steps([ETH0]))


IN_NAMESPACE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from dkvm.container.net.plumbing import open_iproute
from dkvm.guest import network
from dkvm.schema import NetChange
with open_iproute() as ip:
    ip.link("add", ifname="kernelname", kind="tuntap", mode="tap")
    ip.link("set", index=ip.link_lookup(ifname="kernelname")[0], address="02:42:ac:11:00:02")
network.run_steps(NetChange.from_json(sys.stdin.read()).steps)
with open_iproute() as ip:
    (link,) = ip.get_links(ifname="eth0")
    print(json.dumps({
        "mtu": link.get_attr("IFLA_MTU"), "up": bool(link["flags"] & 1),
        "addresses": sorted(a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=link["index"])
                            if a["scope"] == 0),
        "routes": sorted(f"{r.get_attr('RTA_DST')}/{r['dst_len']} {r.get_attr('RTA_GATEWAY')}"
                         for r in ip.get_routes(family=2, table=254))}))
"""


@pytest.mark.skipif(not shutil.which("unshare") or not os.path.exists("/dev/net/tun"),
                    reason="needs unshare and /dev/net/tun")
def test_steps_rebuild_the_interface_in_a_real_kernel():
    steps = interface_steps([interface(ipv6=False, addresses=ETH0.addresses[:1])])
    steps = [s for s in steps if s.kind not in ("sysctl",     # /proc/sys is the host's here,
                                                "running")]    # and no one reads this tap
    out = subprocess.run(["unshare", "-rnm", "sh", "-c",      # sysfs shows the new namespace
                          'mount -t sysfs sysfs /sys && exec "$@"', "-", sys.executable, "-c",
                          IN_NAMESPACE, str(REPO)],
                         input=NetChange(steps=steps).to_json(), capture_output=True, text=True,
                         timeout=60)
    if out.returncode and "Operation not permitted" in out.stderr:
        pytest.skip("no user namespaces here")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "mtu": 1400, "up": True, "addresses": ["172.17.0.2"],
        "routes": ["10.9.0.0/24 None", "172.17.0.0/16 None", "None/0 172.17.0.1"]}
