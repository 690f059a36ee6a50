"""net.handover: the interfaces handed over in a child process, whose findings come
back as records, and whose failure is one line."""
import os
import time

import pytest

from dkvm.container.net.handover import Handover
from dkvm.errors import DkvmError
from dkvm.schema import Interface, NetStep, Route


def test_what_the_child_found_comes_back_as_records():
    def work(nics, taps, docker_dns, monitor):
        assert (nics, taps, docker_dns, monitor) == (["eth0"], [7], True, None)
        return ([Interface(name="eth0", mac="02:42:ac:11:00:02").as_dict()],
                [NetStep(kind="sysctl", sysctl={"a": "1"}).as_dict()],
                [Route(gateway="172.17.0.1", mac="02:42:ac:11:00:02").as_dict()])
    interfaces, steps, routes = Handover(["eth0"], [7], True, work=work).result()
    assert interfaces == [Interface(name="eth0", mac="02:42:ac:11:00:02")]
    assert steps == [NetStep(kind="sysctl", sysctl={"a": "1"})]
    assert routes == [Route(gateway="172.17.0.1", mac="02:42:ac:11:00:02")]


def test_the_childs_failure_is_one_line():
    def work(nics, taps, docker_dns, monitor):
        raise DkvmError("no such device")
    with pytest.raises(DkvmError, match="cannot hand the container's interfaces to the "
                                        "VM: no such device"):
        Handover([], [], False, work=work).result()


def test_a_child_that_dies_or_hangs_is_an_error_and_is_not_left_behind():
    def die(nics, taps, docker_dns, monitor):
        os._exit(3)
    with pytest.raises(DkvmError, match="the helper process died"):
        Handover([], [], False, work=die).result()

    def hang(nics, taps, docker_dns, monitor):
        time.sleep(60)
    handover = Handover([], [], False, work=hang)
    with pytest.raises(DkvmError, match="took over 0.2s"):
        handover.result(timeout=0.2)
    with pytest.raises(ChildProcessError):
        os.waitpid(handover.pid, os.WNOHANG)


def test_what_the_monitor_heard_before_is_dropped_what_comes_after_stays():
    import socket
    from dkvm.container.net.handover import drain
    heard, said = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for _ in range(5):
        said.send(b"RTM_NEWADDR")
    drain(heard)
    said.send(b"RTM_NEWLINK")
    assert heard.recv(100, socket.MSG_DONTWAIT) == b"RTM_NEWLINK"
