"""What happens at which step: the learning-rate schedule and the data order.

Both are pure functions of the step (and the seed), which is what makes a resumed run land on exactly
the same learning rates and batches as an uninterrupted one.

**Learning rate.** With ``s`` the number of optimizer steps already taken (0 for the first step),
``W`` warmup steps, ``T = max_steps`` and ``m = min_lr_ratio``, the multiplier on each group's base
learning rate is::

    warmup   (s < W):    (s + 1) / (W + 1)                    # linear ramp, never a wasted lr=0 step
    decay    (s >= W):   p = (s - W) / max(1, T - W)          # progress through the decay, 0 → 1
             cosine:     m + (1 - m) * (1 + cos(pi * p)) / 2   # Loshchilov & Hutter, SGDR (2017)
             linear:     m + (1 - m) * (1 - p)
             constant:   1

:func:`make_scheduler` wraps it in ``torch.optim.lr_scheduler.LambdaLR``, so every parameter group
(LoRA+ passes several with different base rates) follows the same shape.

**Data order** lives in :mod:`tunelab.train.samplers` (``EpochSampler`` is re-exported here for
code written before the samplers had their own module).
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from tunelab.train.samplers import EpochSampler, epoch_seed  # re-exported

SCHEDULES = ("cosine", "linear", "constant")


def resolve_warmup_steps(max_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    """Warmup length in optimizer steps: ``warmup_steps`` when given, else ``ceil(ratio * max_steps)``."""
    if warmup_steps is not None:
        return min(warmup_steps, max_steps)
    return min(math.ceil(warmup_ratio * max_steps), max_steps)


def lr_multiplier(
    step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """The factor on the base learning rate for the optimizer step with 0-based index ``step``.

    Args:
        step: optimizer steps already taken (``LambdaLR``'s ``last_epoch``).
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"``.
        warmup_steps: length of the linear warmup ``W``.
        total_steps: ``max_steps`` ``T``; the decay runs from ``W`` to ``T``.
        min_lr_ratio: floor ``m`` of the cosine / linear decay, as a fraction of the base rate.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_multiplier` to every parameter group.

    The multiplier is a ``functools.partial`` so that ``state_dict()`` holds only the step counter and
    base rates: on resume, the schedule comes from the (current) config, the position from the checkpoint.
    """
    multiplier = functools.partial(
        lr_multiplier,
        schedule=schedule,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=min_lr_ratio,
    )
    return LambdaLR(optimizer, lr_lambda=multiplier)


__all__ = ["SCHEDULES", "EpochSampler", "epoch_seed", "lr_multiplier", "make_scheduler", "resolve_warmup_steps"]
