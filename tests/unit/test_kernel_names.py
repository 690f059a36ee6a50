"""Capabilities, rlimits and signals by name and number (kernel_names), as runc takes
them."""
import pytest

from dkvm.kernel_names import signal_number


@pytest.mark.parametrize("text,number", [("9", 9), ("KILL", 9), ("SIGKILL", 9),
                                         ("sigstop", 19), ("RTMIN+3", 37), ("SIGRTMAX-1", 63),
                                         ("RTMIN", 34), ("65", None), ("RTMIN+31", None),
                                         ("NOPE", None)])
def test_signal_names_as_runc_takes_them(text, number):
    assert signal_number(text) == number
