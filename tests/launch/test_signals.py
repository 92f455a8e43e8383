"""Contract: a stop signal only sets a flag; at the step boundary the stop is agreed, a checkpoint is
written unless the step was just saved, and the loop is told to stop; without a signal nothing happens."""

import os
import signal

import pytest

from megatron_vp2o.launch.signals import StopOnSignal


class FakeSession:
    def __init__(self):
        self.saved = []

    def save(self, state):
        self.saved.append(state.step)


class State:
    step = 7


@pytest.mark.parametrize("sig", [signal.SIGURG, signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
@pytest.mark.parametrize("saved", [False, True])
def test_signal_then_step_boundary(sig, saved):
    before = signal.getsignal(sig)
    stopper, sess = StopOnSignal(), FakeSession()
    try:
        assert not stopper.after_step(sess, State(), saved=False) and sess.saved == [] and not stopper.stopped
        os.kill(os.getpid(), sig)
        assert stopper.received == sig
        assert stopper.after_step(sess, State(), saved=saved) and stopper.stopped
        assert sess.saved == ([] if saved else [7])
    finally:
        stopper.restore()
    assert signal.getsignal(sig) == before  # handlers put back


def test_second_sigint_interrupts_at_once():
    stopper = StopOnSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stopper.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stopper.restore()
