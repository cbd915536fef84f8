"""The base of every loss weighting: per-task losses in, one scalar to backpropagate out (LibMTL style).

A weighting sees, at each step, the losses ``L_i`` of the tasks present in the batch (a dict keyed by
task name) and the *shared* trainable parameters ``θ_s`` (those every task's loss reaches: the
backbone or the shared adapter; never a task's own head or adapter). It returns a
:class:`~tunelab.train.objective.LossOutput` whose ``loss`` the loop backpropagates.

Most weightings return ``Σ_i w_i L_i`` with weights that are fixed (equal, static), learned
(uncertainty) or computed from the loss history (DWA). Gradient-manipulation methods (GradNorm's
weight update, PCGrad's projection) need the per-task gradients ``g_i = ∇_{θ_s} L_i``: they compute
them with ``torch.autograd.grad`` inside ``combine`` and return a *surrogate* loss whose value is the
plain loss but whose gradient is the manipulated one (see :func:`surrogate`), so the generic loop,
gradient accumulation and clipping work unchanged.

Learned weightings hold ``nn.Parameter`` s: the multi-task objective returns the weighting from its
``modules()``, so they join the optimizer and the checkpoint. History (DWA's previous losses,
GradNorm's initial losses) is in :meth:`Weighting.extra_state`, saved in the objective state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tunelab.train.objective import LossOutput


class Weighting(nn.Module):
    """Combine per-task losses into one loss. Subclasses implement :meth:`combine`.

    Args:
        tasks: every task name the weighting may see (learned weightings make one parameter each).
    """

    needs_gradients = False  # True: combine() calls autograd.grad over the shared parameters

    def __init__(self, tasks: Sequence[str], **options: Any) -> None:
        super().__init__()
        self.tasks = list(tasks)

    def combine(self, losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter] = ()) -> LossOutput:
        raise NotImplementedError

    def weighted_sum(self, losses: Mapping[str, torch.Tensor], weights: Mapping[str, float | torch.Tensor]) -> LossOutput:
        """``Σ_i w_i L_i`` with the weights logged as ``w/<task>``."""
        total = sum(weights[name] * loss for name, loss in losses.items())
        metrics = {f"w/{name}": float(weights[name]) for name in losses}
        return LossOutput(total, metrics)

    def extra_state(self) -> dict[str, Any]:
        """JSON-able history that is not a parameter (saved in the objective state)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        return None


def task_gradients(losses: Mapping[str, torch.Tensor], shared: Sequence[nn.Parameter]) -> dict[str, torch.Tensor]:
    """``{task: ∇_{θ_s} L_i flattened}`` (P,) each; parameters a loss does not reach give zeros."""
    grads = {}
    for name, loss in losses.items():
        parts = torch.autograd.grad(loss, list(shared), retain_graph=True, allow_unused=True)
        grads[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                 for g, p in zip(parts, shared, strict=True)])
    return grads


def surrogate(plain: torch.Tensor, shared: Sequence[nn.Parameter], plain_grad: torch.Tensor,
              wanted_grad: torch.Tensor) -> torch.Tensor:
    """A loss equal in value to ``plain`` whose gradient on ``θ_s`` is ``wanted_grad``, elsewhere ``plain``'s.

    ``plain_grad`` is ``∇_{θ_s} plain`` (flattened). With ``c = wanted_grad - plain_grad`` (constant)::

        S(θ) = plain(θ) + <c, θ_s> - <c, θ_s>.detach()      ⇒  S = plain,  ∇_{θ_s} S = wanted_grad

    while task-specific parameters (heads, task adapters) keep ``plain``'s gradient.
    """
    correction = (wanted_grad - plain_grad).detach()
    flat = torch.cat([p.reshape(-1) for p in shared])
    term = (correction * flat).sum()
    return plain + term - term.detach()
