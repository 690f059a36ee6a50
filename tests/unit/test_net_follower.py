"""Following Docker's network changes (container/net/follower.py): the change diffs,
NICs hot-plugged and unplugged, a refused hot-plug reported once. The QMP client is in
test_qmp.py, the guest's side of a change in test_guest_network.py."""
import pytest

from dkvm import wire
from dkvm.container.net import follower as net_follower
from dkvm.errors import DkvmError
from dkvm.schema import Interface, Route


def test_route_changes_move_the_default_gateway():
    old_default = Route(gateway="172.17.0.1", mac="02:00:00:00:00:05")
    new_default = Route(gateway="172.18.0.1", mac="02:00:00:00:00:09")
    static = Route(dst_len=16, dst="10.1.0.0", mac="02:00:00:00:00:05")
    assert net_follower.route_changes([old_default, static], [static, new_default]) == (
        [old_default], [new_default])
    assert net_follower.route_changes([static], [static]) == ([], [])


def route(gateway):
    return Route(family=2, gateway=gateway)


class FakeLink(dict):
    def __init__(self, index, name, up=True):
        super().__init__(index=index, flags=1 if up else 0)
        self.name = name

    def get_attr(self, attr):
        return {"IFLA_IFNAME": self.name, "IFLA_ADDRESS": f"02:00:00:00:00:{self['index']:02x}",
                "IFLA_MTU": 1500}[attr]


class FakeIp:
    """The container namespace as follow() sees it: links and Docker's routes."""

    def __init__(self, links, routes):
        self.links, self.routes, self.deleted = links, routes, []

    def link(self, command, index):
        assert command == "del"
        self.deleted.append(index)


class FakeQmp:
    def __init__(self, refuse=()):
        self.refuse, self.commands = refuse, []

    def execute(self, command, **arguments):
        self.commands.append((command, arguments.get("id")))
        if command in self.refuse:
            raise DkvmError(f"QEMU refused {command}: no free PCI slot")

    def close(self):
        pass


@pytest.fixture
def follower(monkeypatch):
    """A NetworkFollower over a FakeIp: eth0 was there at boot (tap 0)."""
    ip = FakeIp([FakeLink(5, "eth0")], {5: [route("172.17.0.1")]})
    monkeypatch.setattr(net_follower, "guest_links", lambda ip: list(ip.links))
    monkeypatch.setattr(net_follower, "docker_routes", lambda ip, index, mac: [
        Route(**{**route.as_dict(), "mac": mac}) for route in ip.routes.get(index, [])])
    monkeypatch.setattr(net_follower, "describe", lambda ip, link: Interface(
        name=link.name, index=link["index"], mac=link.get_attr("IFLA_ADDRESS"),
        routes=ip.routes.get(link["index"], [])))
    monkeypatch.setattr(net_follower, "create_tap", lambda tap, mtu: 100 + int(tap[8:]))
    monkeypatch.setattr(net_follower, "hand_over", lambda ip, index, tap_index: None)
    monkeypatch.setattr(net_follower, "ipv6_sysctls", lambda: {})
    follower = net_follower.NetworkFollower()
    follower.nics, follower.next_number = {5: 0}, 1
    follower.routes = follower.current_routes(ip)
    follower.ip = ip
    yield follower
    follower.monitor.close()


def sent(follower):
    follower.inbox.setblocking(False)
    try:
        return wire.Decoder().feed(follower.inbox.recv(1 << 20))[0].record()
    except BlockingIOError:
        return None


def test_follow_plugs_a_new_interface_and_moves_the_default_gateway(follower):
    ip = follower.ip
    ip.links.append(FakeLink(9, "eth1"))
    ip.routes = {9: [route("172.18.0.1")]}                          # Docker moved it
    follower.qmp = FakeQmp()
    follower.follow(ip)
    assert follower.qmp.commands == [("netdev_add", "net1"), ("device_add", "nic1")]
    change = sent(follower)
    assert change.wait_for == ["02:00:00:00:00:09"]
    assert [step.what for step in change.steps if step.what] == [
        "rename (eth1)", "rename to eth1 (eth1)", "set eth1 up (eth1)",
        "removing route default via 172.17.0.1", "route default via 172.18.0.1"]
    assert [(step.mac, step.optional) for step in change.steps[-2:]] == [
        ("02:00:00:00:00:05", True), ("02:00:00:00:00:09", True)]
    follower.follow(ip)
    assert sent(follower) is None                                   # nothing new: silence


def test_follow_waits_for_libnetwork_to_bring_the_interface_up(follower):
    follower.ip.links.append(FakeLink(9, "eth1", up=False))
    follower.qmp = FakeQmp()
    follower.follow(follower.ip)
    assert follower.qmp.commands == [] and sent(follower) is None


def test_a_refused_hot_plug_is_reported_once_and_the_rest_still_follows(follower, capsys,
                                                                         log_context):
    log_context.set_role("entrypoint")
    log_context.set_container("0123456789abcdef")
    ip = follower.ip
    ip.links.append(FakeLink(9, "eth1"))
    ip.routes[5] = [route("172.17.0.254")]
    follower.qmp = FakeQmp(refuse={"device_add"})
    follower.follow(ip)
    assert follower.qmp.commands == [("netdev_add", "net1"), ("device_add", "nic1"),
                                     ("netdev_del", "net1")]
    assert ip.deleted == [101]                                      # its tap is gone
    err = capsys.readouterr().err
    assert err.count("dkvm[entrypoint 0123456789ab]: cannot hot-plug eth1 into the VM, it "
                     "stays in the container: QEMU refused device_add: no free PCI slot") == 1
    assert sent(follower).steps[-1].what == "route default via 172.17.0.254"
    follower.follow(ip)                                             # the clean-up's events
    assert follower.qmp.commands[3:] == [] and capsys.readouterr().err == ""


def test_follow_unplugs_a_vanished_interface(follower, monkeypatch):
    unplugged = []
    monkeypatch.setattr(follower, "unplug", lambda ip, number: unplugged.append(number))
    follower.ip.links.clear()
    follower.ip.routes.clear()
    follower.follow(follower.ip)
    assert unplugged == [0] and follower.nics == {}
    assert sent(follower).steps[0].what == "removing route default via 172.17.0.1"


def link_message(kind, index):
    from dkvm.container.net.follower import IFI_INDEX, NLMSGHDR
    body = bytes(4) + IFI_INDEX.pack(index) + bytes(8)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, 0, 0, 0) + body


def test_our_taps_changing_need_no_look_anything_else_does():
    from dkvm.container.net.follower import RTM_DELLINK, RTM_NEWLINK, only_about
    taps = {7, 8}
    assert only_about(link_message(RTM_NEWLINK, 7) + link_message(RTM_NEWLINK, 8), taps)
    assert only_about(link_message(RTM_DELLINK, 7), taps)
    assert not only_about(link_message(RTM_NEWLINK, 3), taps)       # Docker's veth
    assert not only_about(link_message(RTM_NEWLINK, 7) + link_message(20, 7), taps)  # an address
    assert not only_about(b"", taps)                                 # lost events: look


def test_the_follower_holds_the_shared_monitor_for_one_change_only(follower):
    """QEMU serves one QMP client: the follower takes the monitor it shares with a
    pod's member exports (shared_monitor) for a change, and gives it back after."""
    from dkvm.container.shared_monitor import SharedMonitor

    class Monitor(SharedMonitor):
        def connect(self, wait=0.1, connect=None):
            return super().connect(wait, connect=lambda path: FakeQmp())

    follower.shared_monitor = monitor = Monitor("/nonexistent/qmp.sock")
    qmp = follower.monitor_qmp()
    assert monitor.lock.locked() and follower.monitor_qmp() is qmp  # one client a change
    with pytest.raises(DkvmError, match="stayed busy"):
        monitor.connect()                                           # the other thread waits
    qmp.close()
    assert not monitor.lock.locked()
