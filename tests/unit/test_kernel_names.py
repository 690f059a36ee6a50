"""Capabilities, rlimits and signals by name and number (kernel_names), as runc takes
them; what a process's status says it does with a signal."""
import signal

import pytest

from dkvm.kernel_names import handles_signal, signal_number


@pytest.mark.parametrize("text,number", [("9", 9), ("KILL", 9), ("SIGKILL", 9),
                                         ("sigstop", 19), ("RTMIN+3", 37), ("SIGRTMAX-1", 63),
                                         ("RTMIN", 34), ("65", None), ("RTMIN+31", None),
                                         ("NOPE", None)])
def test_signal_names_as_runc_takes_them(text, number):
    assert signal_number(text) == number


def own_status():
    with open("/proc/self/status", "rb") as f:
        return f.read()


def test_status_shows_what_a_process_catches_blocks_and_ignores():
    assert not handles_signal(own_status(), signal.SIGUSR2)
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        assert handles_signal(own_status(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
    try:
        assert handles_signal(own_status(), signal.SIGUSR2)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR2])
