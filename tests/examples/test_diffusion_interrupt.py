"""examples/diffusion/interrupt.py: the first Ctrl-C (or SIGTERM) is a request the loop reads between
steps, the second stops at once, and the previous handlers come back afterwards."""

import os
import signal

import pytest

from examples.diffusion.interrupt import StopRequest, Stopped


def test_the_first_signal_is_a_request_and_the_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        stop.check()                                  # nothing asked yet: no exception
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT" and stop.exit_status == 130
        with pytest.raises(Stopped, match="SIGINT"):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_is_a_request_too_with_its_own_exit_status():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM" and stop.exit_status == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
