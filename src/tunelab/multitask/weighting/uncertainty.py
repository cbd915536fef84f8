"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, "Multi-Task Learning Using Uncertainty to
Weigh Losses for Scene Geometry and Semantics", https://arxiv.org/abs/1705.07115).

Each task has a learned homoscedastic noise ``σ_i``; the loss is

    L = Σ_i  L_i / (2 σ_i²) + log σ_i

We learn ``s_i = log σ_i²`` (numerically stable, as the paper's appendix advises), so
``1/(2σ_i²) = exp(-s_i)/2`` and ``log σ_i = s_i/2``::

    L = Σ_i  ½ exp(-s_i) L_i + ½ s_i

A task whose loss stays high gets a larger ``σ_i`` and a smaller weight; ``log σ_i`` stops ``σ`` from
growing without bound. The optimum for a fixed ``L_i`` is ``σ_i² = L_i``. ``s`` starts at 0 (weight ½)
and trains with the model (the objective's ``modules()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tunelab.multitask.weighting.base import Weighting
from tunelab.train.objective import LossOutput


class UncertaintyWeighting(Weighting):
    def __init__(self, tasks: Sequence[str], init_log_variance: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_variance = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(float(init_log_variance))) for name in tasks})  # s_i = log σ_i²

    def combine(self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter] = ()) -> LossOutput:
        total = 0.0
        metrics = {}
        for name, loss in losses.items():
            s = self.log_variance[name]
            total = total + 0.5 * torch.exp(-s) * loss + 0.5 * s
            metrics[f"w/{name}"] = float(0.5 * torch.exp(-s.detach()))
        return LossOutput(total, metrics)
