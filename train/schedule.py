"""Learning-rate schedules: a pure function of the step, so resuming needs nothing but the step.

For optimizer step s (0-based) of max_steps, with W warmup steps:
- warmup (all schedules): lr · (s + 1) / W for s < W;
- cosine: min_lr + (lr − min_lr) · ½(1 + cos(π · p)), p = (s − W) / (max_steps − 1 − W), from lr at
  the end of warmup to min_lr at the last step (GPT-3, Chinchilla, the GLA and Mamba-2 papers);
- wsd (warmup-stable-decay, MiniCPM arXiv 2404.06395): lr until the last D steps, then linear
  to min_lr (D = decay_steps, default 20% of max_steps);
- constant: lr after warmup.
"""
from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, min_lr: float, max_steps: int, warmup_steps: int, schedule: str,
                  decay_steps: int | None = None) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, max_steps - 1 - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay = decay_steps if decay_steps is not None else max(1, round(0.2 * max_steps))
        decay = min(decay, max_steps - warmup_steps)
        start = max_steps - decay
        if step < start:
            return lr
        progress = min(1.0, (step - start + 1) / decay)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def for_recipe(train) -> callable:
    """step -> learning rate, from a recipe's train section."""
    return lambda step: learning_rate(step, lr=train.lr, min_lr=train.min_lr, max_steps=train.max_steps,
                                      warmup_steps=train.warmup_steps, schedule=train.schedule,
                                      decay_steps=train.decay_steps)
