"""SIGTERM ends a run as cancelled even when the first exception it raises is swallowed."""

import os
import signal
import time

import pytest

from lrc.errors import LrcError
from lrc.run import Signals


@pytest.fixture
def restored_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGALRM)}
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_sigterm_swallowed_once_is_raised_again_until_caught(restored_handlers):
    signals = Signals().install()
    swallowed = []

    def search():
        try:  # like scipy's Sobol initialisation (Cython): it prints "Exception ignored" and goes on
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        except LrcError as exc:
            swallowed.append(exc)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the search carries on ...
            time.sleep(0.01)
        pytest.fail("the run went on after SIGTERM")

    with pytest.raises(LrcError, match="cancelled by SIGTERM"):
        search()
    signals.disarm()
    assert len(swallowed) == 1
    time.sleep(2 * Signals.REPEAT_S)  # disarmed: nothing is raised any more


def test_sigterm_while_requeueing_is_not_a_cancellation(restored_handlers):
    signals = Signals()
    signals.submitit_usr2 = lambda signum, frame: None
    signals.install()
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)  # the requeued job carries on: no exception
    time.sleep(2 * Signals.REPEAT_S)
    assert signals.requeueing and signals.cancelled is None
