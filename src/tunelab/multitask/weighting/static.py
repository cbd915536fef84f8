"""Static weighting: fixed, user-chosen weights.

    L = Σ_i w_i L_i / Σ_{i present} w_i

``weights`` maps task names to ``w_i`` (default 1); normalising by the weights of the tasks in the
batch keeps one-task batches at the scale of their task's loss times ``w_i / w_i = 1`` — so with
per-batch task switching static weights act through the *relative* scale only when several tasks
share a batch; set ``normalize: false`` for the plain ``Σ w_i L_i`` (then a one-task batch is scaled
by ``w_i``, which is how a static weight acts under per-batch switching).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.multitask.weighting.base import Weighting
from tunelab.train.objective import LossOutput


class StaticWeighting(Weighting):
    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None, normalize: bool = True) -> None:
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ConfigError(f"weighting static: unknown task {unknown[0]!r} in weights; tasks: {', '.join(tasks)}")
        self.weights = {name: float(weights.get(name, 1.0)) for name in tasks}
        self.normalize = normalize

    def combine(self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter] = ()) -> LossOutput:
        norm = sum(self.weights[name] for name in losses) if self.normalize else 1.0
        return self.weighted_sum(losses, {name: self.weights[name] / norm for name in losses})
