"""The learning-rate schedule: linear warmup, then cosine decay to a floor, or constant.

The factor is a pure function of the step index, so a resumed run recomputes exactly the learning
rate an uninterrupted one would use; the scheduler's saved state is only its step counter.

Step i (0-based; the i-th optimizer step) uses lr · f(i):

    warmup  (i < W):  f(i) = (i + 1) / W           reaches 1 at the last warmup step, never 0
    cosine  (i ≥ W):  f(i) = m + (1 − m) · ½ (1 + cos(π · (i − W) / max(1, S − W − 1)))
                      1 at the first step after warmup, m = min_lr_ratio at the last step S − 1
    constant (i ≥ W): f(i) = 1

Warmup starts at lr / W rather than 0 because a step at lr = 0 only spends data and time.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from train.config import TrainConfig


def lr_factor(
    step_index: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    """f(i) above: the multiple of the peak learning rate used by optimizer step `step_index`."""
    if step_index < warmup_steps:
        return (step_index + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    progress = min(1.0, (step_index - warmup_steps) / max(1, total_steps - warmup_steps - 1))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """A LambdaLR over `lr_factor`; call `.step()` once per optimizer step, skipped ones included.

    Skipped (non-finite) steps still advance the schedule: the schedule is tied to the step
    number, like the data order, so a skip never shifts the rest of the run.
    """

    def factor(i: int) -> float:
        return lr_factor(
            i,
            schedule=cfg.schedule,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            min_lr_ratio=cfg.min_lr_ratio,
        )

    return LambdaLR(optimizer, factor)
