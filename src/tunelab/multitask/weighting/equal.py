"""Equal weighting: the mean of the task losses present in the batch.

    L = (1 / K) Σ_{i=1..K} L_i

The baseline of every multi-task comparison (LibMTL's ``EW`` sums; the mean keeps the learning rate
independent of the number of tasks and equals the single-task loss when a batch has one task).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tunelab.multitask.weighting.base import Weighting
from tunelab.train.objective import LossOutput


class EqualWeighting(Weighting):
    def combine(self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter] = ()) -> LossOutput:
        return self.weighted_sum(losses, {name: 1.0 / len(losses) for name in losses})
