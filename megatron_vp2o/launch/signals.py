"""Stop on a signal with a checkpoint: preemption and the end of a slurm time limit.

What: :class:`StopOnSignal` installs handlers for SIGURG, SIGTERM, SIGUSR1 and SIGINT that only set a flag
(nothing unsafe runs inside a signal handler). At the end of each training step the trainer calls
:meth:`StopOnSignal.after_step`: the flag is max-reduced over every rank (one 1-element all-reduce;
a signal reaching only some ranks stops all of them at the same step, so the collective checkpoint
that follows cannot deadlock), the trainer saves (unless this step was just saved) and leaves its
loop; ``vp2o train --resume`` continues exactly from that checkpoint.

Which signal: SIGURG is the one to send to a whole job step (the sbatch scripts do, with ``scancel
--signal=URG``, when slurm warns the batch script before the time limit: ``--signal=B:USR1@T``).
Its default action is *ignore*, so every other process of the step lives on: torchrun keeps
waiting for its workers, and megatron's checkpoint writer helper (a spawned multiprocessing
manager) can still take the checkpoint. SIGTERM and SIGUSR1 also work when they reach the workers
alone (``kill``, torchrun forwarding its own SIGTERM), but slurm's SIGTERM to *every* process
(``scancel``, preemption) also ends that helper, so the stop checkpoint then fails; the newest
periodic checkpoint (written atomically) is what ``--resume`` continues from. SIGINT (Ctrl-C) stops
the same way; a second SIGINT before the step ends raises KeyboardInterrupt (leave now, no checkpoint).
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist

from megatron_vp2o.device import device

STOP_SIGNALS = (signal.SIGURG, signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopOnSignal:
    """A flag set by STOP_SIGNALS; :meth:`should_stop` agrees on it across all ranks."""

    def __init__(self, signals=STOP_SIGNALS):
        self.received: int | None = None
        self.stopped = False  # set by after_step once the stop is agreed and the checkpoint written
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the step to end
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank iff some rank has received a stop signal (collective when distributed)."""
        flag = 1 if self.received is not None else 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag_t = torch.tensor([flag], dtype=torch.int32, device=device())
            dist.all_reduce(flag_t, op=dist.ReduceOp.MAX)
            flag = int(flag_t.item())
        return bool(flag)

    def after_step(self, sess, state, saved: bool) -> bool:
        """At a step boundary: if a stop signal arrived anywhere, checkpoint (unless this step was
        ``saved`` already), set :attr:`stopped` and return True."""
        if not self.should_stop():
            return False
        if not saved:
            sess.save(state)
        self.stopped = True
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"vp2o: stop signal received: checkpoint at step {state.step} written; "
                  "continue with --resume", file=sys.stderr, flush=True)
        return True

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
