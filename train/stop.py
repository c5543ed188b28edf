"""When a run stops early: a stop signal on any rank, the job's end time, or too many non-finite steps in a row.

- SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask for a checkpoint and a clean exit. The
  flag is all-reduced at every step boundary, so every rank stops at the same step. A signal that
  arrives while this rank waits for its data interrupts the wait (`interrupting`): the step is not
  taken and the data-loader state from before it is saved; one that arrives during evaluation ends
  the evaluation (train/evaluator.py), which the resumed run does again.
- The job's end time: inside a SLURM job with SLURM_JOB_END_TIME (SLURM >= 23.02 sets it; recur's
  batch script sets it from squeue on older ones), the run stops by itself `train.stop_margin_s`
  before it, as if signalled (a SIGALRM timer), so a lost warning signal loses no work. Every job
  trains at least one step first (the timer starts after it), so a --time shorter than the margin
  still makes progress.
- The handlers are installed again after the first step: a library that installs its own (NCCL's
  communicators are created at the first collective) does not take them over.
"""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager

from .engine import TrainingError


class DataWaitInterrupted(BaseException):
    """A stop signal arrived while this rank waited for its data (BaseException: no `except Exception` in a
    data library swallows it)."""


def job_end_time(environ=None) -> float | None:
    """SLURM_JOB_END_TIME (a UNIX time) when it is set and plausible, else None."""
    value = (os.environ if environ is None else environ).get("SLURM_JOB_END_TIME", "")
    try:
        end = float(value)
    except ValueError:
        return None
    return end if end > 0 else None


class StopPolicy:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask for a checkpoint and a clean exit, as
    does the job's end time less `margin_s`; `max_bad_steps` non-finite steps in a row (loss or gradient
    norm) end the run as diverged."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, max_bad_steps: int, margin_s: float = 0.0, environ=None):
        self.max_bad_steps = max_bad_steps
        self.received: str | None = None
        self.bad_in_a_row = 0
        self.end_time = job_end_time(environ)
        self.deadline = None if self.end_time is None else self.end_time - margin_s
        self.margin_s = margin_s
        self.armed = False
        self._raise = None  # an exception class the handler raises (inside `interrupting`)
        self.install()

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        if self.deadline is not None:
            signal.signal(signal.SIGALRM, self._deadline_reached)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        self._interrupt()

    def _deadline_reached(self, signum=None, frame=None):
        if self.received is None:
            self.received = (f"the job's end time ({time.strftime('%H:%M:%S', time.localtime(self.end_time))}, "
                             f"SLURM_JOB_END_TIME) less train.stop_margin_s ({self.margin_s:g} s)")
        self._interrupt()

    def _interrupt(self):
        kind, self._raise = self._raise, None
        if kind is not None:
            raise kind()

    @contextmanager
    def interrupting(self, kind: type[BaseException]):
        """Inside: a stop signal raises `kind` at once (one already received raises it on entry)."""
        if self.received is not None:
            raise kind()
        self._raise = kind
        try:
            yield
        finally:
            self._raise = None

    def after_first_step(self, say=print) -> None:
        """Install the handlers again, and start the timer for the job's end time."""
        if self.armed:
            return
        self.armed = True
        self.install()
        if self.deadline is not None:
            left = self.deadline - time.time()
            if left <= 0:
                say(f"warning: the job ends in {self.end_time - time.time():.0f} s, within train.stop_margin_s "
                    f"({self.margin_s:g} s): stopping after this first step")
                self._deadline_reached()
            else:
                signal.setitimer(signal.ITIMER_REAL, left)

    def local(self) -> bool:
        """Whether this rank should stop (a signal, or the job's end time is near); no collective."""
        if self.armed and self.deadline is not None and self.received is None and time.time() >= self.deadline:
            self._deadline_reached()  # (the timer's signal was lost)
        return self.received is not None

    def requested(self, device) -> bool:
        """Whether any rank received a stop signal (all-reduced, so every rank stops at the same step)."""
        from .distributed import all_reduce

        return bool(all_reduce([self.local()], device, "max")[0])

    def step_was_bad(self, step: int, grad_norm: float, applied: bool, last_saved) -> bool:
        """Count a step; raises TrainingError when the run diverged. A NaN loss gives NaN gradients,
        so the gradient norm and whether DeepSpeed applied the update tell it without a host sync."""
        if math.isfinite(grad_norm) and applied:
            self.bad_in_a_row = 0
            return False
        self.bad_in_a_row += 1
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingError(f"{self.bad_in_a_row} non-finite steps in a row (up to step {step}): the run "
                                f"diverged. Lower train.lr or raise train.warmup_steps, then resume=auto from the "
                                f"last checkpoint (step {last_saved})")
        return True
