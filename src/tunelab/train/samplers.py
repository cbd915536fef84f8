"""Samplers decide which records form the next batch, and carry their state for an exact resume.

The protocol is three methods::

    class Sampler(Protocol):
        def next_indices(self) -> list[int]: ...        # this process's next micro-batch
        def state_dict(self) -> dict: ...               # JSON-able: saved in every checkpoint
        def load_state_dict(self, state: dict) -> None: ...

Every sampler here is a pure function of ``(seed, position)``: restoring the position restores the
stream exactly, which is what the SIGKILL-resume test checks.

- :class:`EpochSampler` (the default): epochs of seeded permutations.
- :class:`GroupSampler`: records in groups (tasks, domains); each batch comes from one group drawn
  with probability ``p_i`` — proportional ``p_i ∝ n_i``, uniform ``p_i = 1/K``, temperature
  ``p_i ∝ n_i^{1/T}`` (Arivazhagan et al. 2019), or annealed ``p_i ∝ n_i^{α(t)}`` with ``α`` going
  linearly from 1 (proportional) to 0 (uniform) over training (Stickland & Murray 2019 use
  ``α = 1 - 0.8 (e-1)/(E-1)`` per epoch; ours is the per-step version with a floor ``min_alpha``).
  With ``mixed=True`` every *row* draws its group, giving mixed batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Sampler(Protocol):
    def next_indices(self) -> list[int]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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


GROUP_STRATEGIES = ("proportional", "uniform", "temperature", "annealed")


def group_probabilities(
    sizes: Sequence[int], strategy: str, temperature: float = 2.0, progress: float = 0.0, min_alpha: float = 0.0
) -> list[float]:
    """Sampling probabilities of groups of ``sizes`` records (see the module docstring).

    Args:
        sizes: records per group ``n_i``.
        strategy: ``proportional`` (α=1), ``uniform`` (α=0), ``temperature`` (α=1/T), ``annealed``
            (α = max(min_alpha, 1 - progress)).
        temperature: T of the temperature strategy.
        progress: fraction of training done, in [0, 1] (annealed only).
    """
    if strategy not in GROUP_STRATEGIES:
        raise ValueError(f"unknown sampling strategy {strategy!r}; choose one of {', '.join(GROUP_STRATEGIES)}")
    alpha = {"proportional": 1.0, "uniform": 0.0, "temperature": 1.0 / temperature,
             "annealed": max(min_alpha, 1.0 - min(max(progress, 0.0), 1.0))}[strategy]
    weights = [float(n) ** alpha if n > 0 else 0.0 for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


class GroupSampler:
    """Batches drawn group by group (per-task sampling for multi-task, per-domain for replay).

    Each group walks its own seeded epochs (as :class:`EpochSampler`), so no record repeats within a
    group's epoch. The group of step ``s`` is drawn by a generator seeded from ``(seed, s)``: the
    state is just the step and each group's position.

    Args:
        groups: record indices of each group (into the training records).
        batch_size: records per micro-batch (per process).
        seed: sampling seed.
        strategy: see :func:`group_probabilities`.
        temperature: T for ``temperature``.
        total_steps: micro-batches over the whole run (``max_steps * grad_accum``), for ``annealed``.
        mixed: draw the group per row (mixed-task batches) instead of per batch.
    """

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, seed: int, *,
                 strategy: str = "proportional", temperature: float = 2.0, total_steps: int = 1,
                 min_alpha: float = 0.0, mixed: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("GroupSampler needs at least one group and no empty group")
        self.groups = [list(g) for g in groups]
        self.batch_size, self.seed = batch_size, seed
        self.strategy, self.temperature, self.min_alpha = strategy, temperature, min_alpha
        self.total_steps, self.mixed = max(1, total_steps), mixed
        self.rank, self.world_size = rank, world_size
        group_probabilities([len(g) for g in self.groups], strategy, temperature)  # validates strategy
        self.step = 0
        self.samplers = [EpochSampler(len(g), batch_size, epoch_seed(seed, 1000 + i), rank=rank,
                                      world_size=world_size) for i, g in enumerate(self.groups)]

    def probabilities(self) -> list[float]:
        return group_probabilities([len(g) for g in self.groups], self.strategy, self.temperature,
                                   progress=self.step / self.total_steps, min_alpha=self.min_alpha)

    def _draw(self, count: int) -> list[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.step))
        weights = torch.tensor(self.probabilities(), dtype=torch.float64)
        return torch.multinomial(weights, count, replacement=True, generator=generator).tolist()

    def next_indices(self) -> list[int]:
        """The next micro-batch: one group's records, or (``mixed``) each row from its own group."""
        if not self.mixed:
            group = self._draw(1)[0]
            local = self.samplers[group].next_indices()
            indices = [self.groups[group][i] for i in local]
        else:
            rows = self._draw(self.batch_size * self.world_size)[self.rank :: self.world_size]
            indices = []
            for group in sorted(rows):  # rows of one group together: per-row routing runs on contiguous blocks
                sampler = self.samplers[group]
                if sampler.position >= sampler.num_records:
                    sampler.epoch, sampler.position, sampler._order = sampler.epoch + 1, 0, None
                indices.append(self.groups[group][sampler._permutation()[sampler.position]])
                sampler.position += 1
        self.step += 1
        return indices

    def group_of(self, index: int) -> int:
        """The group a record index belongs to (first match)."""
        for group, members in enumerate(self.groups):
            if index in members:
                return group
        raise KeyError(index)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "groups": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        for sampler, group_state in zip(self.samplers, state["groups"], strict=True):
            sampler.load_state_dict(group_state)
