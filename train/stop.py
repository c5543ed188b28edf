"""When a run stops early: a stop signal on any rank, or too many non-finite steps in a row."""
from __future__ import annotations

import math
import signal

from .engine import TrainingError


class StopPolicy:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask for a checkpoint and a clean exit;
    `max_bad_steps` non-finite steps in a row (loss or gradient norm) end the run as diverged."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.received: str | None = None
        self.bad_in_a_row = 0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def requested(self, device) -> bool:
        """Whether any rank received a stop signal (all-reduced, so every rank stops at the same step)."""
        from .distributed import all_reduce

        return bool(all_reduce([self.received is not None], device, "max")[0])

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
