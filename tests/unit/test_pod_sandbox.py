"""A pod's sandbox taking its members: container.supervisor with a pod listener,
container.member_exports against a fake QMP monitor (and a stand-in for virtiofsd)
and container.framed receiving the export's descriptors, as one integration test (the
supervisor's part needs the other two to be seen working): the export served and
hot-plugged once the guest runs, its tag in the MEMBER_START the guest gets, the
member's frames after it, the unplug once the member has gone; refusals in one line
to the member's relay; an exec into a member passed on as it is."""
import os
import socket
import threading

import pytest

from harness import WAIT, FakeVm, Peer, against_scenario
from dkvm import wire
from dkvm.container import supervisor as supervisor_module
from dkvm.container.member_exports import MemberExports
from dkvm.container.signal_inbox import SignalInbox
from dkvm.container.supervisor import Supervisor
from dkvm.errors import DkvmError
from dkvm.roles.ctr_entrypoint import listen
from dkvm.schema import ExecStart, MemberStart, Plan, PodVolume, Process
from dkvm.wire import (CLOSE, ERROR, EXEC_EXIT, EXEC_START, EXIT, EXIT_ACK, HELLO,
                       MEMBER_START, SIGNAL, STDIN, STDOUT)
from waiting import wait_until


class FakeQmp:
    def __init__(self, monitor):
        self.monitor = monitor

    def execute(self, command, fd=None, **arguments):
        with self.monitor.lock:
            self.monitor.commands.append((command, arguments.get("id") or
                                          arguments.get("fdname")))
        if fd is not None:
            os.write(fd, b"vhost-user")        # the member sees its export reached QEMU
        if command in self.monitor.refuse:
            raise DkvmError(f"QEMU refused {command}: no free PCI slot")

    def wait_event(self, name, matches, timeout):
        return {"event": name}

    def close(self):
        pass


class FakeMonitor:
    def __init__(self):
        self.lock = threading.Lock()
        self.commands, self.refuse = [], set()

    def connect(self):
        return FakeQmp(self)

    def seen(self):
        with self.lock:
            return list(self.commands)


def plugged(tag):
    return [("getfd", tag), ("chardev-add", f"{tag}-vfs"), ("device_add", f"{tag}-fs")]


def unplugged(tag):
    return [("device_del", f"{tag}-fs"), ("chardev-remove", f"{tag}-vfs")]


class FakeVirtiofsd:
    pid = 0             # no process: no descriptors to count

    def wait(self, timeout=None):
        return 0

    def kill(self):
        pass


class FakeServe:
    """start_virtiofsd's stand-in: by tag, the directory served and the far end of the
    socket QEMU gets."""

    def __init__(self):
        self.served = {}
        self.held = {}              # tag -> an Event its serving waits for

    def __call__(self, directory, tag, sys_admin):
        if tag in self.held:
            assert self.held[tag].wait(WAIT)
        ours, far = socket.socketpair()
        self.served[tag] = (os.readlink(f"/proc/self/fd/{directory}"), far)
        return FakeVirtiofsd(), ours

    def reached_qemu(self, tag):
        far = self.served[tag][1]
        far.settimeout(WAIT)
        return far.recv(64) == b"vhost-user"

    def close(self):
        for _, far in self.served.values():
            far.close()


class Member(Peer):
    """A member's relay: its MEMBER_START goes with its export's descriptors (the
    directory `share`, this process's mount namespace), or with `fds` of its own."""

    def start(self, container_id, share="/", fds=None, extra=b"", volumes=()):
        """`volumes`: [(destination, directory)], as host.rewrite.with_pod_volumes and
        the relay hand them over."""
        data = wire.encode(MEMBER_START, MemberStart(
            container_id=container_id, plan=Plan(
                process=Process(args=[container_id]),
                pod_volumes=[PodVolume(destination=d) for d, _ in volumes])))
        if fds is None:
            fds = [os.open(share, os.O_PATH | os.O_DIRECTORY),
                   os.open("/proc/self/ns/mnt", os.O_RDONLY)] + [
                os.open(directory, os.O_PATH | os.O_DIRECTORY) for _, directory in volumes]
        socket.send_fds(self.sock, [data + extra], fds)
        for fd in fds:
            os.close(fd)

    def refused(self):
        frame = self.recv()
        assert frame.type == ERROR
        assert self.sock.recv(1) == b""     # then its end
        return frame.record().message


@pytest.fixture
def sandbox(tmp_path):
    """The supervisor of a pod's sandbox in this thread against a scenario played by
    the guest and the members in another; returns its status or error."""
    exec_listener = listen(str(tmp_path / "exec.sock"), backlog=8)
    pod_listener = listen(str(tmp_path / "members.sock"), backlog=64)
    control, guest_end = socket.socketpair()
    network_inbox, network_outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monitor, serve = FakeMonitor(), FakeServe()
    exports = MemberExports(monitor, serve)
    signals = SignalInbox()
    opened = [Peer(guest_end)]

    def connect_member():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT)
        sock.connect(str(tmp_path / "members.sock"))
        opened.append(Member(sock))
        return opened[-1]

    def run(scenario, plan=None):
        supervisor = Supervisor(control, exec_listener, network_inbox, FakeVm(), signals,
                                plan or Plan(pod="sandbox"), pod_listener=pod_listener,
                                exports=exports)
        return against_scenario(supervisor, lambda: scenario(opened[0], connect_member),
                                opened, "pod-scenario")

    run.monitor, run.serve, run.exports = monitor, serve, exports
    yield run
    exports.close()
    serve.close()
    signals.close()
    for peer in opened:
        peer.close()
    for sock in (control, exec_listener, pod_listener, network_inbox, network_outbox):
        sock.close()


def test_a_member_is_plugged_once_the_guest_runs_and_unplugged_when_it_has_gone(sandbox,
                                                                                tmp_path):
    monitor = sandbox.monitor

    def scenario(guest, connect_member):
        nginx = connect_member()
        nginx.start("nginx", share=tmp_path, extra=wire.encode(STDIN, b"early"))
        guest.quiet()                                   # no device before the guest runs
        assert monitor.seen() == []
        guest.send(HELLO)
        start = guest.recv()
        record = start.record()
        assert (start.type, record.container_id, record.tag) == (MEMBER_START, "nginx", "m0")
        assert record.plan.process.args == ["nginx"]
        assert monitor.seen() == plugged("m0")          # before the guest heard of it
        assert sandbox.serve.served["m0"][0] == str(tmp_path)   # its directory, served
        assert sandbox.serve.reached_qemu("m0")
        channel = start.channel
        assert channel != 0
        assert guest.recv() == wire.Frame(STDIN, channel, b"early")    # after its start
        guest.send(STDOUT, b"serving\n", channel)
        assert nginx.recv() == wire.Frame(STDOUT, 0, b"serving\n")
        nginx.send(SIGNAL, {"signal": 15})
        assert guest.recv() == wire.Frame(SIGNAL, channel, b'{"signal":15}')

        sidecar = connect_member()                      # the next one: a tag of its own
        sidecar.start("sidecar")
        assert guest.recv().record().tag == "m1"

        guest.send(EXEC_EXIT, {"status": 143}, channel)
        assert nginx.recv() == wire.Frame(EXEC_EXIT, 0, b'{"status":143}')
        nginx.close()                                   # the relay leaves with the status
        assert guest.recv() == wire.Frame(CLOSE, channel)
        wait_until(lambda: monitor.seen()[6:] == unplugged("m0"), "the unplug", WAIT, 0.01)
        wait_until(lambda: list(sandbox.exports.served) == ["m1"], "m0 let go", WAIT, 0.01)
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == wire.Frame(EXIT_ACK)

    assert sandbox(scenario) == 0


def test_a_volume_members_share_is_one_export_unplugged_after_the_last(sandbox, tmp_path):
    """Each volume is exported once for the pod, by its directory's identity: the
    members' starts name its tag, and it goes when no member uses it."""
    monitor = sandbox.monitor
    shared, own = tmp_path / "shared", tmp_path / "own"
    shared.mkdir()
    own.mkdir()

    def scenario(guest, connect_member):
        guest.send(HELLO)
        server = connect_member()
        server.start("server", volumes=[("/data", shared), ("/own", own)])
        first = guest.recv()
        assert [(v.destination, v.tag) for v in first.record().plan.pod_volumes] == [
            ("/data", "v0"), ("/own", "v1")]
        sidecar = connect_member()
        sidecar.start("sidecar", volumes=[("/in", shared)])
        second = guest.recv()
        assert [(v.destination, v.tag) for v in second.record().plan.pod_volumes] == [
            ("/in", "v0")]
        assert monitor.seen() == plugged("m0") + plugged("v0") + plugged("v1") + plugged("m1")
        assert (sandbox.serve.served["v0"][0], sandbox.serve.served["v1"][0]) == (
            str(shared), str(own))
        for member, start, seen, unplugs in (
                # the server ends: its export and the volume only it used go
                (server, first, 12, unplugged("m0") + unplugged("v1")),
                # the last member using the shared one ends: it goes too
                (sidecar, second, 16, unplugged("m1") + unplugged("v0"))):
            guest.send(EXEC_EXIT, {"status": 0}, start.channel)
            assert member.recv().type == EXEC_EXIT
            member.close()
            assert guest.recv() == wire.Frame(CLOSE, start.channel)
            wait_until(lambda: monitor.seen()[seen:] == unplugs, "the unplugs", WAIT, 0.01)
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == wire.Frame(EXIT_ACK)

    assert sandbox(scenario) == 0


def test_a_members_start_waits_for_its_volumes_plug_and_its_relay_too(sandbox, tmp_path):
    """Its export is in, a volume's plug is not: the guest hears of the member only
    once it is, and the relay's frames wait for that too."""
    monitor = sandbox.monitor
    sandbox.serve.held["v0"] = threading.Event()

    def scenario(guest, connect_member):
        guest.send(HELLO)
        member = connect_member()
        member.start("late", volumes=[("/data", tmp_path)], extra=wire.encode(STDIN, b"x"))
        wait_until(lambda: monitor.seen() == plugged("m0"), "its own plug", WAIT, 0.01)
        member.close()                                  # its relay goes meanwhile
        guest.quiet(0.2)
        sandbox.serve.held["v0"].set()
        start = guest.recv()
        assert (start.type, [v.tag for v in start.record().plan.pod_volumes]) == (
            MEMBER_START, ["v0"])
        assert guest.recv() == wire.Frame(STDIN, start.channel, b"x")
        assert guest.recv() == wire.Frame(CLOSE, start.channel)
        guest.send(EXEC_EXIT, {"status": 137}, start.channel)
        wait_until(lambda: monitor.seen()[3:] == plugged("v0") + unplugged("m0")
                   + unplugged("v0"), "both unplugged", WAIT, 0.01)
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == wire.Frame(EXIT_ACK)

    assert sandbox(scenario) == 0


def test_a_member_killed_is_unplugged_once_the_guest_has_ended_it(sandbox, monkeypatch):
    """SIGKILL takes the relay first: the guest hears CLOSE, kills the member and says
    so (EXEC_EXIT), and only then does its export go; without that word, after
    MEMBER_END_WAIT."""
    monitor = sandbox.monitor
    monkeypatch.setattr(supervisor_module, "MEMBER_END_WAIT", 0.5)

    def scenario(guest, connect_member):
        guest.send(HELLO)
        members = [connect_member(), connect_member()]
        channels = []
        for number, member in enumerate(members):
            member.start(f"c{number}")
            channels.append(guest.recv().channel)
        for member, channel in zip(members, channels):
            member.close()
            assert guest.recv() == wire.Frame(CLOSE, channel)
        guest.quiet(0.2)
        assert monitor.seen() == plugged("m0") + plugged("m1")
        guest.send(EXEC_EXIT, {"status": 137}, channels[0])
        wait_until(lambda: monitor.seen()[6:] == unplugged("m0"), "the first unplug", WAIT, 0.01)
        wait_until(lambda: monitor.seen()[8:] == unplugged("m1"), "the timed-out unplug", WAIT,
                   0.01)
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == wire.Frame(EXIT_ACK)

    assert sandbox(scenario) == 0


def test_refusals_are_one_line_to_the_member_and_nothing_to_the_guest(sandbox, monkeypatch):
    monitor = sandbox.monitor
    monkeypatch.setattr(supervisor_module, "MOST_EXECS", 2)

    def scenario(guest, connect_member):
        guest.send(HELLO)
        bare = connect_member()
        bare.start("bare", fds=[])
        assert bare.refused() == ("a member's start comes with its export: its directory, "
                                  "its mount namespace and its 0 volumes (at most 8; 0 "
                                  "descriptors came)")
        three = connect_member()
        three.start("three", fds=[os.open("/", os.O_PATH), os.open("/proc/self/ns/mnt", 0),
                                  os.open("/", os.O_PATH)])
        assert "; 3 descriptors came)" in three.refused()
        not_a_namespace = connect_member()
        not_a_namespace.start("x", fds=[os.open("/", os.O_PATH), os.open("/", os.O_PATH)])
        assert "; 2 descriptors came)" in not_a_namespace.refused()
        other_namespace = connect_member()
        other_namespace.start("x", fds=[os.open("/", os.O_PATH),
                                        os.open("/proc/self/ns/net", 0)])
        assert "; 2 descriptors came)" in other_namespace.refused()
        other = connect_member()
        other.send(STDIN, b"not a start")
        assert "starts with MEMBER_START or EXEC_START, not frame type" in other.refused()
        exec_with_fd = connect_member()
        socket.send_fds(exec_with_fd.sock, [wire.encode(EXEC_START, ExecStart(member="x"))],
                        [exec_with_fd.sock.fileno()])
        assert exec_with_fd.refused() == "an exec into a member carries no descriptor"

        first = connect_member()
        first.start("first")
        channel = guest.recv().channel
        again = connect_member()
        again.start("first")
        assert again.refused() == "container first runs in this pod already"
        second = connect_member()
        second.start("second")
        guest.recv()
        third = connect_member()
        third.start("third")
        assert third.refused() == ("too many containers in this pod (at most 2); this one "
                                   "was not started")
        monitor.refuse.add("device_add")
        fourth = connect_member()
        first.close()                                   # room again
        assert guest.recv() == wire.Frame(CLOSE, channel)
        fourth.start("fourth")
        assert fourth.refused() == ("the pod's VM cannot take this container's files: QEMU "
                                    "refused device_add: no free PCI slot")
        assert ("chardev-remove", "m2-vfs") in monitor.seen()       # undone
        # a second start on a running member's channel ends that channel
        second.start("second")
        assert "MEMBER_START begins a pod's channel, once" in second.refused()
        assert guest.recv().type == CLOSE
        guest.quiet()                                   # nothing else reached the guest
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == wire.Frame(EXIT_ACK)

    assert sandbox(scenario) == 0


def test_an_exec_into_a_member_is_passed_on_as_it_is(sandbox):
    def scenario(guest, connect_member):
        guest.send(HELLO)
        relay = connect_member()
        start = ExecStart(process=Process(args=["sh"]), member="nginx")
        relay.send(EXEC_START, start)
        frame = guest.recv()
        assert (frame.type, frame.record()) == (EXEC_START, start)
        guest.send(EXEC_EXIT, {"status": 3}, frame.channel)
        assert relay.recv().record().status == 3
        relay.close()
        assert guest.recv() == wire.Frame(CLOSE, frame.channel)
        guest.send(EXIT, {"status": 0})
        assert guest.recv() == wire.Frame(EXIT_ACK)

    assert sandbox(scenario) == 0
    assert sandbox.monitor.seen() == []
