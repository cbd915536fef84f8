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

**Data order.** :class:`EpochSampler` walks the training records in epochs; epoch ``e`` is the
permutation drawn by a ``torch.Generator`` seeded from ``(seed, e)``. Its position ``(epoch, index
within epoch)`` is all it needs to continue, and it is saved in every checkpoint.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

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


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed mixed from ``(seed, epoch)`` (NumPy's SeedSequence: no collisions
    between e.g. (0, 1) and (1, 0))."""
    state = np.random.SeedSequence((seed % 2**63, epoch)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpochSampler:
    """Deterministic batches of record indices, resumable from ``(epoch, position)``.

    Each epoch is ``torch.randperm(n)`` under a generator seeded with :func:`epoch_seed`. Batches take
    ``batch_size`` consecutive indices of that permutation; the tail that cannot fill a batch is
    skipped (a new permutation reshuffles it into the next epoch), so every batch has the same size —
    which keeps gradient accumulation an exact average. When there are fewer records than
    ``batch_size``, each epoch is one batch of all of them.

    Under data parallelism every process draws the same global batch of ``batch_size * world_size``
    indices and keeps its strided share ``[rank::world_size]``.
    """

    def __init__(
        self,
        num_records: int,
        batch_size: int,
        seed: int,
        *,
        epoch: int = 0,
        position: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_records = num_records
        self.global_batch = min(batch_size * world_size, num_records)
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = epoch, position
        self._order: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._order is None:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            self._order = torch.randperm(self.num_records, generator=generator).tolist()
        return self._order

    def next_indices(self) -> list[int]:
        """The indices of this process's next micro-batch; advances the position."""
        if self.position + self.global_batch > self.num_records:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        start = self.position
        self.position += self.global_batch
        batch = self._permutation()[start : self.position]
        return batch[self.rank :: self.world_size]

    def state_dict(self) -> dict[str, int]:
        """The data position: epoch and records consumed within it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
