"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, "End-to-End Multi-Task Learning with
Attention", https://arxiv.org/abs/1803.10704, eq. 7).

The weight of task ``i`` follows the rate at which its loss falls:

    r_i(t-1) = L_i(t-1) / L_i(t-2)
    w_i(t)   = K exp(r_i(t-1) / T) / Σ_j exp(r_j(t-1) / T)

``L_i(t)`` is task ``i``'s mean loss over period ``t`` (an epoch in the paper; here a window of
``period`` steps, since multi-task runs are step-based); ``w_i = 1`` for the first two periods, and
``T`` (default 2) smooths the weights. A task whose loss stalls (ratio near 1) gets more weight than one
whose loss falls fast. The loss is ``Σ_i w_i L_i / K`` over the tasks present (the mean, so ``w = 1``
is :class:`~tunelab.multitask.weighting.equal.EqualWeighting`). The history is saved with the
objective state, so a resumed run continues the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tunelab.multitask.weighting.base import Weighting
from tunelab.train.objective import LossOutput


def dwa_weights(previous: Mapping[str, float], before: Mapping[str, float], temperature: float) -> dict[str, float]:
    """``w_i = K softmax(r / T)_i`` with ``r_i = previous_i / before_i`` (the equation above)."""
    ratios = {name: previous[name] / max(before[name], 1e-12) for name in previous}
    exps = {name: math.exp(r / temperature) for name, r in ratios.items()}
    total = sum(exps.values())
    return {name: len(exps) * e / total for name, e in exps.items()}


class DWAWeighting(Weighting):
    def __init__(self, tasks: Sequence[str], temperature: float = 2.0, period: int = 20) -> None:
        super().__init__(tasks)
        self.temperature, self.period = temperature, period
        self.history: list[dict[str, float]] = []  # mean loss per task of each finished period
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.calls = 0

    def current_weights(self) -> dict[str, float]:
        if len(self.history) < 2:
            return {name: 1.0 for name in self.tasks}
        previous, before = self.history[-1], self.history[-2]
        known = [n for n in self.tasks if n in previous and n in before]
        weights = dwa_weights({n: previous[n] for n in known}, {n: before[n] for n in known}, self.temperature)
        return {name: weights.get(name, 1.0) for name in self.tasks}

    def combine(self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter] = ()) -> LossOutput:
        weights = self.current_weights()
        out = self.weighted_sum(losses, {name: weights[name] / len(losses) for name in losses})
        if torch.is_grad_enabled():  # training steps only: eval losses do not move the history
            for name, loss in losses.items():
                self.sums[name] = self.sums.get(name, 0.0) + float(loss.detach())
                self.counts[name] = self.counts.get(name, 0) + 1
            self.calls += 1
            if self.calls % self.period == 0:
                self.history.append({n: self.sums[n] / self.counts[n] for n in self.sums})
                self.history = self.history[-2:]
                self.sums, self.counts = {}, {}
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"history": self.history, "sums": self.sums, "counts": self.counts, "calls": self.calls}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
        self.sums, self.counts = dict(state.get("sums", {})), dict(state.get("counts", {}))
        self.calls = int(state.get("calls", 0))
