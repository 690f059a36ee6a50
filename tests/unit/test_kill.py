"""`runc kill` of SIGKILL/SIGSTOP: the runtime (host root) reaches the entrypoint's
signal socket in a /run the container side can write, so it follows no link there,
connects only to a socket, and only to the one the entrypoint itself listens on."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from unitutil import OpenWatch
from dkvm.host import kill
from dkvm.host.runc_cli import parse
from dkvm.kernel_names import SIGKILL, SIGSTOP, handles_signal
from waiting import wait_until


@pytest.fixture
def proc(tmp_path):
    """A stand-in for /proc/<pid> whose `root` holds the container's /run."""
    (tmp_path / "proc" / "root" / "run").mkdir(parents=True)
    return tmp_path / "proc"


def listening(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    sock.setblocking(False)
    return sock


def connect(proc, pid=None):
    fd = os.open(proc, os.O_PATH | os.O_DIRECTORY)
    try:
        return kill.connect_signal_socket(fd, pid or os.getpid(), 1)
    finally:
        os.close(fd)


def assert_never_connected(listener):
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_the_entrypoints_own_socket_is_connected(proc):
    listener = listening(proc / "root/run/signal.sock")
    sock = connect(proc)
    assert sock is not None
    sock.sendall(b"9\n")
    conn, _ = listener.accept()
    conn.setblocking(True)
    assert conn.recv(8) == b"9\n"
    for s in (sock, conn, listener):
        s.close()


@pytest.mark.parametrize("swap", ["socket", "run"])
def test_a_socket_swapped_for_a_link_is_not_followed(proc, tmp_path, swap):
    """The container side (QEMU's uid) replaced signal.sock, or /run, with a link to a
    socket of the host's: nothing connects to it."""
    host = tmp_path / "host"
    host.mkdir()
    host_listener = listening(host / "signal.sock")
    if swap == "socket":
        os.symlink(host / "signal.sock", proc / "root/run/signal.sock")
    else:
        os.rmdir(proc / "root/run")
        os.symlink(host, proc / "root/run")
    assert connect(proc) is None
    assert_never_connected(host_listener)
    host_listener.close()


def test_a_socket_someone_else_listens_on_is_refused(proc):
    """Any socket the container side binds there itself is not the entrypoint's."""
    listener = listening(proc / "root/run/signal.sock")
    assert connect(proc, pid=os.getpid() + 100000) is None
    listener.close()


def test_a_fifo_or_a_file_there_is_not_opened(proc):
    os.mkfifo(proc / "root/run/signal.sock")
    reader = os.open(proc / "root/run/signal.sock", os.O_RDONLY | os.O_NONBLOCK)
    with OpenWatch(proc / "root/run/signal.sock") as watch:
        assert connect(proc) is None
        assert not watch.opened()
    os.close(reader)


def test_a_container_whose_pid_changed_meanwhile_is_left_to_runc(monkeypatch):
    """The pid runc named is held (/proc/<pid> open) and asked again: a process that
    has since taken the pid is never sent the request."""
    answers = iter([os.getpid(), 0])
    monkeypatch.setattr(kill, "container_pid", lambda *args: next(answers))
    monkeypatch.setattr(kill, "connect_signal_socket",
                        lambda *args: pytest.fail("connected to a process not the container's"))
    assert kill.deliver_in_guest(parse(["kill", "ctr", "KILL"]), "runc") is True


@pytest.mark.parametrize("args,target", [
    (["id"], (15, "id")), (["id", "9"], (SIGKILL, "id")), (["--all", "id", "KILL"],
                                                           (SIGKILL, "id")),
    (["-a", "id", "STOP"], (SIGSTOP, "id")), ([], (None, "")),
])
def test_the_kill_command_line(args, target):
    call = parse(["--root", "/r", "kill", *args])
    assert (kill.kill_signal(call), call.container_id) == target


def test_a_container_that_stopped_with_its_workload_needs_no_runc_kill(monkeypatch):
    """The guest's SIGKILL ended the workload, the entrypoint with it: runc would only
    fail (no running container) where the signal was delivered."""
    states = {"state": "stopped"}

    def container_pid(runc, call, statuses=("running",)):
        return 42 if states["state"] in statuses else 0
    monkeypatch.setattr(kill, "container_pid", container_pid)
    call = parse(["kill", "c1", "KILL"])
    assert kill.still_to_kill(call, "runc", 42) is False
    states["state"] = "running"
    assert kill.still_to_kill(call, "runc", 42) is True
    states["state"] = "stopped"
    assert kill.still_to_kill(parse(["kill", "--all", "c1", "KILL"]), "runc", 42) is True


# --- a signal sent while the VM boots: the runtime waits until the entrypoint blocks it

# a stand-in entrypoint (its command line ends as DKVM's does) that blocks SIGTERM only
# when told to, on its stdin
BLOCKS_WHEN_TOLD = ("import signal, sys; sys.stdin.readline(); "
                    "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]); "
                    "print('blocked', flush=True); sys.stdin.readline()")


def test_the_runtime_waits_until_dkvms_entrypoint_blocks_the_signal(monkeypatch):
    looks = []
    monkeypatch.setattr(kill, "handles_signal",
                        lambda status, signum: looks.append(signum) or handles_signal(status,
                                                                                      signum))
    child = subprocess.Popen([sys.executable, "-c", BLOCKS_WHEN_TOLD,
                              "/.dkvm/entry/dkvm-ctr-entrypoint"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    returned = []
    waiter = threading.Thread(target=lambda: returned.append(
        kill.wait_until_blocked(child.pid, signal.SIGTERM, timeout=10)), daemon=True)
    try:
        wait_until(lambda: b"dkvm-ctr-entrypoint" in open(f"/proc/{child.pid}/cmdline",
                                                            "rb").read(),
                   "the stand-in to start", timeout=10, interval=0.005)
        waiter.start()
        wait_until(lambda: len(looks) >= 3, "the runtime to look at it", timeout=10,
                   interval=0.005)
        assert waiter.is_alive() and not returned          # not blocked yet: still waiting
        started = time.monotonic()
        child.stdin.write("block\n")
        child.stdin.flush()
        assert child.stdout.readline() == "blocked\n"
        waiter.join(timeout=10)
        assert not waiter.is_alive() and returned == [None]
        assert time.monotonic() - started < 5              # on the block, not the timeout
        with open(f"/proc/{child.pid}/status", "rb") as f:
            assert handles_signal(f.read(), signal.SIGTERM)
    finally:
        child.kill()
        child.wait()
        if waiter.ident:
            waiter.join(timeout=10)


def test_the_runtime_does_not_wait_for_a_process_not_dkvms():
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = time.monotonic()
        kill.wait_until_blocked(child.pid, signal.SIGTERM, timeout=5)
        assert time.monotonic() - started < 2.5          # well short of the bound
    finally:
        child.kill()
        child.wait()


# --- a pod's member: its relay forwards the catchable signals; KILL and STOP are runc's

def test_a_members_sigkill_and_sigstop_go_to_runc_as_they_are(monkeypatch):
    """The relay has no signal socket to ask: runc kills it, its channel closes, and
    the guest kills the member."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()",
                              "/.dkvm/entry/dkvm-pod-member"], stdin=subprocess.PIPE)
    try:
        wait_until(lambda: b"dkvm-pod-member" in open(f"/proc/{child.pid}/cmdline",
                                                        "rb").read(),
                   "the stand-in to start", timeout=10, interval=0.005)
        monkeypatch.setattr(kill, "container_pid", lambda *args, **kw: child.pid)
        monkeypatch.setattr(kill, "connect_signal_socket",
                            lambda *args: pytest.fail("asked a member's relay"))
        for signum in ("KILL", "STOP"):
            assert kill.deliver_in_guest(parse(["kill", "ctr", signum]), "runc") is True
    finally:
        child.kill()
        child.wait()


def test_the_runtime_waits_until_a_members_relay_blocks_the_signal():
    """Not blocked yet: the runtime keeps looking (here until its bound); once the
    relay blocks the signal, at once."""
    child = subprocess.Popen([sys.executable, "-c", BLOCKS_WHEN_TOLD,
                              "/.dkvm/entry/dkvm-pod-member"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: b"dkvm-pod-member" in open(f"/proc/{child.pid}/cmdline",
                                                        "rb").read(),
                   "the stand-in to start", timeout=10, interval=0.005)
        started = time.monotonic()
        kill.wait_until_blocked(child.pid, signal.SIGTERM, timeout=0.3)
        assert time.monotonic() - started >= 0.3
        child.stdin.write("block\n")
        child.stdin.flush()
        assert child.stdout.readline() == "blocked\n"
        started = time.monotonic()
        kill.wait_until_blocked(child.pid, signal.SIGTERM, timeout=5)
        assert time.monotonic() - started < 2.5          # well short of the bound
    finally:
        child.kill()
        child.wait()
