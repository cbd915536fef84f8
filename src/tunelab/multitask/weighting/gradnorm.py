"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks", https://arxiv.org/abs/1711.02257).

Learned task weights ``w_i`` balance the gradient norms that the tasks put on the shared parameters
``W`` (ours: every shared trainable parameter), so that tasks train at similar rates:

    G_i   = || ∇_W (w_i L_i) ||_2 = w_i || ∇_W L_i ||_2          Ḡ = mean_i G_i
    L̃_i  = L_i(t) / L_i(0)                                      r_i = L̃_i / mean_j L̃_j
    L_grad = Σ_i | G_i - Ḡ · r_i^α |                              (Ḡ · r_i^α held constant)

``L_grad`` updates only the weights; the network minimises ``Σ_i w_i L_i / K`` (``K`` tasks present,
so equal weights give the mean); after every update the weights are renormalised to ``Σ_i w_i = K``
(here at the start of the next step). ``α`` (default 1.5, the paper's value for NYUv2) sets how hard
slow tasks are pushed.

How the code maps to it: ``∇_W L_i`` comes from ``torch.autograd.grad`` (one backward per task,
``retain_graph``); the returned loss is ``Σ w_i.detach() L_i / K + L_grad - L_grad.detach()`` — its
value is the weighted loss the loop logs, its gradient on the network is ``Σ w_i ∇L_i / K`` and on
``w`` is ``∇_w L_grad``, exactly GradNorm's two updates in one backward. Without shared trainable
parameters (per-task adapters on a frozen backbone), one task in the batch, or outside training,
it is the weighted sum with the current weights. Cost: one extra backward per task per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tunelab.multitask.weighting.base import Weighting, task_gradients
from tunelab.train.objective import LossOutput


def gradnorm_loss(weights: torch.Tensor, grad_norms: torch.Tensor, loss_ratios: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """``L_grad = Σ_i |w_i ||g_i|| - mean(G) r_i^α|`` with ``r_i = L̃_i / mean L̃`` (targets detached).

    Args:
        weights: (K,) learned ``w_i``.
        grad_norms: (K,) ``||∇_W L_i||`` (constants).
        loss_ratios: (K,) ``L̃_i = L_i(t) / L_i(0)``.
    """
    norms = weights * grad_norms  # (K,) G_i
    inverse_rate = loss_ratios / loss_ratios.mean()  # (K,) r_i
    target = (norms.mean() * inverse_rate**alpha).detach()  # (K,)
    return (norms - target).abs().sum()


class GradNormWeighting(Weighting):
    needs_gradients = True

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5) -> None:
        super().__init__(tasks)
        self.alpha = alpha
        self.weight = nn.ParameterDict({name: nn.Parameter(torch.tensor(1.0)) for name in tasks})
        self.initial: dict[str, float] = {}  # L_i(0)

    @torch.no_grad()
    def renormalize(self) -> None:
        """``w_i ← K w_i / Σ_j w_j`` (positive weights)."""
        values = torch.stack([p.clamp(min=1e-4) for p in self.weight.values()])
        values = values * len(values) / values.sum()
        for p, value in zip(self.weight.values(), values, strict=True):
            p.copy_(value)

    def combine(self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter] = ()) -> LossOutput:
        self.renormalize()
        names = list(losses)
        for name in names:
            self.initial.setdefault(name, max(float(losses[name].detach()), 1e-12))
        weights = torch.stack([self.weight[name] for name in names])  # (K,)
        plain = sum(weights[k].detach() * losses[name] for k, name in enumerate(names)) / len(names)
        metrics = {f"w/{name}": float(weights[k].detach()) for k, name in enumerate(names)}
        if len(names) < 2 or not shared or not torch.is_grad_enabled():
            return LossOutput(plain, metrics)
        grads = task_gradients(losses, shared)
        grad_norms = torch.stack([grads[name].norm() for name in names]).detach()
        ratios = torch.tensor([float(losses[n].detach()) / self.initial[n] for n in names], device=weights.device)
        l_grad = gradnorm_loss(weights, grad_norms.to(weights.device), ratios, self.alpha)
        metrics["gradnorm_loss"] = float(l_grad.detach())
        return LossOutput(plain + l_grad - l_grad.detach(), metrics)

    def extra_state(self) -> dict[str, Any]:
        return {"initial": self.initial}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.initial = dict(state.get("initial", {}))
