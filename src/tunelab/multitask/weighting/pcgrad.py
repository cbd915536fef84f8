"""PCGrad, "gradient surgery" (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020, "Gradient
Surgery for Multi-Task Learning", https://arxiv.org/abs/2001.06782, Algorithm 1).

When two tasks' gradients on the shared parameters conflict (negative inner product), each is
projected onto the normal plane of the other before they are summed:

    g_i^PC ← g_i;  for j ≠ i in random order:  if g_i^PC · g_j < 0:
        g_i^PC ← g_i^PC − (g_i^PC · g_j / ||g_j||²) g_j
    g = (1/K) Σ_i g_i^PC                 (on the shared parameters; task-specific ones keep ∇L_i)

How the code maps to it: ``g_i = ∇_{θ_s} L_i`` by ``torch.autograd.grad`` (one backward per task);
:func:`pcgrad` is the projection above; the returned loss is the mean ``(1/K) Σ L_i`` plus a linear
term in ``θ_s`` (:func:`~tunelab.multitask.weighting.base.surrogate`) whose value is zero and whose
gradient turns ``∇_{θ_s}`` of the mean into ``g`` — so the loop's single backward applies the surgery.
The random order uses torch's generator (seeded, restored on resume). Without shared trainable
parameters, one task in the batch, or outside training, it is the plain mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tunelab.multitask.weighting.base import Weighting, surrogate, task_gradients
from tunelab.train.objective import LossOutput


def pcgrad(grads: Sequence[torch.Tensor], orders: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
    """Project each ``g_i`` away from the others it conflicts with; returns ``[g_i^PC]``.

    Args:
        grads: K flattened task gradients (P,).
        orders: for each ``i``, the order of the other tasks ``j``; default a random permutation each.
    """
    projected = []
    for i, g in enumerate(grads):
        out = g.clone()
        order = orders[i] if orders is not None else [int(j) for j in torch.randperm(len(grads)) if int(j) != i]
        for j in order:
            if j == i:
                continue
            dot = torch.dot(out, grads[j])
            if dot < 0:
                out = out - dot / grads[j].pow(2).sum().clamp(min=1e-20) * grads[j]
        projected.append(out)
    return projected


class PCGradWeighting(Weighting):
    needs_gradients = True

    def combine(self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter] = ()) -> LossOutput:
        names = list(losses)
        plain = sum(losses.values()) / len(names)
        metrics = {f"w/{name}": 1.0 / len(names) for name in names}
        if len(names) < 2 or not shared or not torch.is_grad_enabled():
            return LossOutput(plain, metrics)
        grads = task_gradients(losses, shared)
        raw = [grads[name] for name in names]
        projected = pcgrad(raw)
        conflicts = sum(int(torch.dot(raw[i], raw[j]) < 0) for i in range(len(raw)) for j in range(i + 1, len(raw)))
        metrics["pcgrad_conflicts"] = float(conflicts)
        wanted = torch.stack(projected).sum(0) / len(names)
        plain_grad = torch.stack(raw).sum(0) / len(names)
        return LossOutput(surrogate(plain, shared, plain_grad, wanted), metrics)
