"""container.pod_member and roles.exec_relay's pod side: a member's relay against a
fake sandbox supervisor over a socketpair (MEMBER_START carrying its export: its
directory and its mount namespace; the signals runc sends it passed on as the
member's; its exit status), its plan completed; an exec into a member reaching the
pod."""
import fcntl
import json
import os
import signal
import socket
import subprocess
import threading

import pytest

from harness import WAIT, Peer, signal_from_another_process
from dkvm.container.pod_member import MemberRelay, complete_member_plan, export_fds
from dkvm.container.signal_inbox import SignalInbox
from dkvm.errors import DkvmError
from dkvm.schema import Plan, Process
from dkvm.wire import ERROR, EXEC_EXIT, EXEC_START, MEMBER_START, SIGNAL, STDIN, STDOUT, WINDOW

PLAN = Plan(container_id="feedface0123", process=Process(args=["nginx"], cwd="/"), pod="member")


@pytest.fixture
def empty_stdin():
    """fd 0 a pipe at EOF, as a container's without stdin."""
    saved = os.dup(0)
    r, w = os.pipe()
    os.dup2(r, 0)
    os.close(r)
    os.close(w)
    yield
    os.dup2(saved, 0)
    os.close(saved)


def receive_start(sock):
    """The MEMBER_START frame's first bytes and the descriptors that came with them."""
    sock.settimeout(WAIT)
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
    return data, fds


def run_member(scenario, signals, share_dir="/"):
    """MemberRelay in this thread (its signals blocked here and in the scenario's
    thread, made after: the kernel hands them to the inbox; the relay closes the
    inbox as it ends) against `scenario(peer)` played as the sandbox's supervisor."""
    mine, theirs = socket.socketpair()
    export = export_fds(share_dir)
    supervisor = Peer(theirs)
    failures = []

    def body():
        try:
            scenario(supervisor)
        except BaseException as err:
            failures.append(err)
        finally:
            supervisor.close()

    thread = threading.Thread(target=body, name="fake-sandbox", daemon=True)
    thread.start()
    try:
        relay = MemberRelay(mine, PLAN, export, signals)
        status = relay.run()
    finally:
        thread.join(WAIT * 4)
        mine.close()
    assert not thread.is_alive()
    if failures:
        raise failures[0]
    assert relay.export == []               # the relay's copies are closed
    return status


def first_frame(supervisor):
    """MEMBER_START as the supervisor reads it: the descriptor with its first bytes."""
    data, fds = receive_start(supervisor.sock)
    supervisor.frames += supervisor.decoder.feed(data)
    start = supervisor.recv()
    return start, fds


def test_member_start_carries_the_export_and_the_members_status_is_the_relays(empty_stdin,
                                                                            tmp_path):
    signals = SignalInbox()
    share = tmp_path / "share"
    (share / "rootfs").mkdir(parents=True)

    def sandbox(supervisor):
        start, fds = first_frame(supervisor)
        assert start.type == MEMBER_START and len(fds) == 2
        record = start.record()
        assert (record.container_id, record.plan.process.args, record.tag) == \
            ("feedface0123", ["nginx"], "")
        assert record.plan.pod == "member"
        directory, namespace = fds
        assert os.fstat(directory).st_ino == share.stat().st_ino      # the export's directory
        assert os.listdir(f"/proc/self/fd/{directory}") == ["rootfs"]
        assert fcntl.ioctl(namespace, 0xB703) == 0x20000                # a mount namespace
        assert os.fstat(namespace).st_ino == os.stat("/proc/self/ns/mnt").st_ino  # ours
        for fd in fds:
            os.close(fd)
        assert supervisor.recv().type == STDIN  # EOF: no stdin
        supervisor.send(STDOUT, b"ready\n")
        assert supervisor.recv().type == WINDOW
        supervisor.send(EXEC_EXIT, {"status": 143})

    assert run_member(sandbox, signals, str(share)) == 143


def test_signals_runc_sends_are_the_members_and_its_own_are_not(empty_stdin, capfdbinary):
    """TERM, INT, HUP, USR1... from outside go to the member's PID 1 as SIGNAL frames,
    each once; our own (a signal we send ourselves) and a child's SIGCHLD do not."""
    signals = SignalInbox()

    def sandbox(supervisor):
        start, fds = first_frame(supervisor)
        for fd in fds:
            os.close(fd)
        assert supervisor.recv().type == STDIN
        os.kill(os.getpid(), signal.SIGUSR2)                    # our own
        subprocess.run(["true"], check=True, timeout=WAIT)      # a child's SIGCHLD
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGINT):
            signal_from_another_process(sig)
        got = [supervisor.recv() for _ in range(4)]
        # (pending together, standard signals leave the signalfd lowest number first)
        assert sorted((f.type, f.record().signal) for f in got) == [
            (SIGNAL, signal.SIGHUP), (SIGNAL, signal.SIGINT), (SIGNAL, signal.SIGUSR1),
            (SIGNAL, signal.SIGTERM)]
        supervisor.quiet()
        supervisor.send(EXEC_EXIT, {"status": 0})

    assert run_member(sandbox, signals) == 0
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])   # restored


def test_a_refused_member_fails_with_the_supervisors_line(empty_stdin):
    signals = SignalInbox()

    def sandbox(supervisor):
        for fd in first_frame(supervisor)[1]:
            os.close(fd)
        supervisor.send(ERROR, {"message": "too many containers in this pod (at most 24)"})

    with pytest.raises(DkvmError) as info:
        run_member(sandbox, signals)
    assert (info.value.message, info.value.exit_code) == (
        "too many containers in this pod (at most 24)", 126)


def test_the_members_export_is_its_directory_without_a_link_followed(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "share").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DkvmError, match="export .*share cannot be opened"):
        export_fds(str(tmp_path / "share"))


def test_the_members_plan_gets_the_terminal_and_the_engines_limits():
    plan = Plan.from_json(PLAN.to_json())
    plan.engine_nofile = [1024, 4096]
    plan = complete_member_plan(plan, [30, 100])
    assert plan.winsize == [30, 100]
    nofile = [r for r in plan.default_rlimits if r.type == "RLIMIT_NOFILE"]
    assert [(r.soft, r.hard) for r in nofile] == [(1024, 4096)]


def test_an_exec_into_a_member_goes_to_the_pod_and_names_the_member(tmp_path, monkeypatch,
                                                                    empty_stdin):
    from dkvm.roles import exec_relay
    monkeypatch.setattr(exec_relay.paths, "POD_SOCKET", str(tmp_path / "members.sock"))
    monkeypatch.setattr(exec_relay.paths, "EXEC_SOCKET", str(tmp_path / "missing.sock"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "members.sock"))
    listener.listen(1)
    listener.settimeout(WAIT)
    request = os.memfd_create("request")
    os.write(request, json.dumps({"container_id": "feedface0123", "member": True,
                                  "process": {"args": ["sh"]}}).encode())
    seen = []

    def pod():
        conn = Peer(listener.accept()[0])
        try:
            start = conn.recv()
            seen.append((start.type, start.record().member, start.record().process.args))
            conn.send(EXEC_EXIT, {"status": 5})
            conn.sock.settimeout(WAIT)
            while conn.sock.recv(1 << 16):      # until the relay leaves: none of its
                pass                            # frames unread (a reset, not an end)
        finally:
            conn.close()

    thread = threading.Thread(target=pod, daemon=True)
    thread.start()
    try:
        assert exec_relay.main(["dkvm-exec-relay", "--request-fd", str(request)]) == 5
    finally:
        thread.join(WAIT)
        listener.close()
    assert seen == [(EXEC_START, "feedface0123", ["sh"])]


def test_a_member_waits_for_the_pods_vm_within_a_bound(tmp_path, monkeypatch):
    from dkvm.container.exec_relay import connect
    with pytest.raises(DkvmError) as info:
        connect(str(tmp_path / "members.sock"), 0, "this container")
    assert info.value.message == "the VM was not ready for this container within 0s"
