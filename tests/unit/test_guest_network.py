"""The guest's network changes (guest/network.py) while the VM runs: a change waits,
in order, for the NICs it names; a NIC not yet running is polled for, never waited on
in the loop; waiting for one to run is bounded."""
import time

from dkvm.guest import network
from dkvm.schema import NetChange, NetStep


def change(*macs):
    return NetChange(wait_for=list(macs),
                     steps=[NetStep(kind="sysctl", sysctl={"for": ",".join(macs)})])


def test_pending_changes_wait_in_order_for_their_nics(monkeypatch):
    present, applied = set(), []
    monkeypatch.setattr(network, "links_by_mac", lambda: {mac: 1 for mac in present})
    monkeypatch.setattr(network, "run_steps",
                        lambda steps, until_waiting: applied.append(steps) or [])
    pending = network.PendingChanges()
    assert pending.timeout(1.0) == 1.0
    first, second = change("02:00:00:00:00:01"), change()
    pending.add(first)
    pending.add(second)                     # needs no NIC, but comes after the first
    assert pending.apply_ready() == [] and applied == []
    assert pending.timeout(1.0) == pending.POLL
    present.add("02:00:00:00:00:01")
    assert pending.apply_ready() == [] and applied == [first.steps, second.steps]
    assert pending.timeout(1.0) == 1.0


def test_a_nic_that_never_shows_up_is_reported_and_skipped(monkeypatch):
    applied = []
    monkeypatch.setattr(network, "links_by_mac", lambda: {})
    monkeypatch.setattr(network, "run_steps",
                        lambda steps, until_waiting: applied.append(steps) or [])
    monkeypatch.setattr(network, "NIC_WAIT", 0)
    pending = network.PendingChanges()
    pending.add(change("02:00:00:00:00:07"))
    pending.add(change())
    errors = pending.apply_ready()
    assert len(errors) == 1 and "02:00:00:00:00:07" in errors[0] and "within 0s" in errors[0]
    assert applied == [change().steps]


def test_a_new_nic_not_yet_running_is_polled_for_not_waited_on(monkeypatch):
    running = set()
    monkeypatch.setattr(network, "links_by_mac", lambda: {"02:00:00:00:00:01": 3})
    monkeypatch.setattr(network, "is_running", lambda name, ipv6: name in running)
    written = []
    monkeypatch.setattr(network.syscalls, "write_sysctls", written.append)
    pending = network.PendingChanges()
    pending.add(NetChange(wait_for=["02:00:00:00:00:01"],
                          steps=[NetStep(kind="sysctl", sysctl={"a": "1"}),
                                 NetStep(kind="running", name="eth1", ipv6=True),
                                 NetStep(kind="sysctl", sysctl={"b": "2"})]))
    start = time.monotonic()
    assert pending.apply_ready() == []
    assert time.monotonic() - start < 2                     # did not wait (RUNNING_WAIT)
    assert written == [{"a": "1"}] and pending.waiting
    assert pending.apply_ready() == [] and written == [{"a": "1"}]
    running.add("eth1")
    assert pending.apply_ready() == []
    assert written == [{"a": "1"}, {"b": "2"}] and not pending.waiting


def test_waiting_for_the_nic_to_run_is_bounded_and_sees_the_link_local(tmp_path, monkeypatch):
    files = {"/sys/class/net/eth0/operstate": "up\n", "/proc/net/if_inet6": ""}
    monkeypatch.setattr(network, "read", lambda path: files.get(path, ""))
    network.wait_until_running("eth0", ipv6=False)
    start = time.monotonic()
    network.wait_until_running("eth0", ipv6=True, timeout=0.3)    # no link-local: gives up
    assert 0.3 <= time.monotonic() - start < 2
    files["/proc/net/if_inet6"] = (                   # the link-local is tentative
        "fd000000000000000000000000000020 02 40 00 80     eth0\n"
        "fe80000000000000004202fffe0a7c14 02 40 20 c0     eth0\n")
    start = time.monotonic()
    network.wait_until_running("eth0", ipv6=True)
    assert time.monotonic() - start < 2                     # not RUNNING_WAIT
