"""Elastic weight consolidation (EWC), online variant: keep the weights that mattered for earlier domains.

Idea (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks",
arXiv:1612.00796): after a stage, the diagonal of the Fisher information says how much each weight
mattered for that stage's data; later stages pay a quadratic price for moving important weights,

    L(θ) = L_task(θ) + (λ / 2) Σ_i F̃_i (θ_i − θ*_i)²

Online EWC (Schwarz et al. 2018, "Progress & Compress", arXiv:1805.06370) keeps one running Fisher and
one anchor instead of one per stage:

    F̃ ← γ F̃ + F_t,        θ* ← θ at the end of stage t

with decay γ ∈ [0, 1] (γ = 1: the Fishers add up; γ = 0: only the last stage counts).

Which Fisher (``fisher``):

- ``empirical`` — F_i = (1/N) Σ_n (∂ℓ_n(y_n) / ∂θ_i)², the gradient of the loss on the data's own labels
  y_n. Cheap and common, but it is the squared gradient of a loss the model has just minimised: on a
  stage the model fits well the gradients are small, so the domains learnt best get the *least*
  protection (Kunstner et al. 2019, "Limitations of the empirical Fisher approximation",
  arXiv:1905.12558).
- ``true`` — F_i = (1/N) Σ_n E_{ŷ ~ p_θ(·|x_n)} (∂ℓ_n(ŷ) / ∂θ_i)², the Fisher information of the model's
  own predictive distribution, as Kirkpatrick et al. define it: the labels are drawn from the model
  (one draw per scored position, at every position the data scores, on the data's teacher-forced
  inputs) instead of read from the data. It does not vanish where the model is confident and right.

Code map: :func:`fisher_diagonal` computes either over N training examples of the stage just finished
(ℓ_n the example's mean token NLL; batches of ``fisher_batch_size`` examples, 1 = exact per-example),
over the *trainable* parameters only;
:func:`ewc_penalty` is the λ/2 term. ``on_stage_end`` folds F_t into F̃ and stores F̃ and θ* on the model
(:mod:`tunelab.adapt.store`), where the next stage's objective finds them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunelab import IGNORE_INDEX
from tunelab.adapt.store import store
from tunelab.objectives.sft import SFTObjective, SFTOptions
from tunelab.train.objective import LossOutput


class EWCOptions(SFTOptions):
    """Options of the ``ewc`` objective."""

    ewc_lambda: float = Field(1000.0, ge=0, description="λ: strength of the quadratic penalty.")
    gamma: float = Field(1.0, ge=0, le=1, description="Online decay γ of the running Fisher (1 = sum, 0 = last stage).")
    fisher_samples: int = Field(64, gt=0, description="Training examples of a finished stage used for its Fisher.")
    fisher_batch_size: int = Field(1, gt=0, description="Examples per gradient for the Fisher (1 = per-example).")
    fisher: Literal["empirical", "true"] = Field(
        "empirical", description="empirical: gradients of the data's labels; true: of labels drawn from the model.")


def model_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution where ``labels`` scores a position.

    Causal LM (``logits`` (B, T, V), ``labels`` (B, T)): the logits at t predict the label at t + 1, so
    position t + 1 gets a draw from softmax(logits[:, t]) wherever ``labels[:, t + 1]`` is scored; ignored
    positions stay ignored. Classification (``logits`` (B, C), ``labels`` (B,)): one draw per row.
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)
    if logits.dim() == 2 and labels.dim() == 1:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(labels.device)
    if logits.dim() == 3 and labels.dim() == 2:
        b, t, v = probs[:, :-1].shape
        drawn = torch.multinomial(probs[:, :-1].reshape(-1, v).cpu(), 1, generator=generator).view(b, t)
        out = labels.clone()
        scored = labels[:, 1:] != IGNORE_INDEX
        out[:, 1:] = torch.where(scored, drawn.to(labels.device), labels[:, 1:])
        return out
    raise ValueError(f"fisher: 'true' needs (B, T, V) logits with (B, T) labels or (B, C) with (B,); got "
                     f"{tuple(logits.shape)} and {tuple(labels.shape)} — use fisher: empirical for this model")


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``labels`` under ``logits`` over the scored positions (the causal shift for (B, T, V))."""
    if logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def fisher_diagonal(model: nn.Module, records: Sequence[Any], collate: Callable, params: Mapping[str, nn.Parameter],
                    samples: int = 64, batch_size: int = 1, kind: str = "empirical",
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``{name: (1/N) Σ_n g_n²}`` of ``params`` over the first ``samples`` records.

    ``kind="empirical"``: ``g_n`` is the gradient of batch ``n``'s mean loss ``model(**batch).loss`` on the
    data's labels. ``kind="true"``: the gradient of the mean NLL of labels drawn from the model
    (:func:`model_labels`, with ``generator``) at the positions the data scores. With ``batch_size=1``
    either is per-example. Run in eval mode (no dropout); gradients are cleared afterwards.
    """
    if kind not in ("empirical", "true"):
        raise ValueError(f"fisher: unknown kind {kind!r} — use 'empirical' or 'true'")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    device = next(iter(params.values())).device
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    chosen = list(records[:samples])
    batches = 0
    for start in range(0, len(chosen), batch_size):
        batch = collate(chosen[start : start + batch_size])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        if kind == "empirical":
            loss = model(**batch).loss
        else:
            labels = batch.pop("labels")
            logits = model(**batch).logits
            loss = _nll(logits, model_labels(logits, labels, generator))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads, strict=True):
            if grad is not None:
                fisher[name] += grad.detach().float() ** 2
        batches += 1
    model.train(was_training)
    return {name: value / max(batches, 1) for name, value in fisher.items()}


def ewc_penalty(params: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor],
                anchor: Mapping[str, torch.Tensor], ewc_lambda: float) -> torch.Tensor:
    """``(λ/2) Σ_i F_i (θ_i − θ*_i)²`` over the names present in all three mappings."""
    names = [name for name in params if name in fisher and name in anchor]
    if not names:
        return torch.zeros(())
    total = sum((fisher[n] * (params[n].float() - anchor[n]) ** 2).sum() for n in names)
    return 0.5 * ewc_lambda * total


class EWCObjective(SFTObjective):
    """``ewc``: SFT loss + online-EWC penalty against the earlier stages' Fisher and anchor."""

    config_class = EWCOptions

    def __init__(self, config=None, **options: Any) -> None:
        super().__init__(config, **options)
        self.params: dict[str, nn.Parameter] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        super().setup(model, accelerator)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        saved = store(model).get("ewc", {})
        device = next(model.parameters()).device
        self.fisher = {k: v.to(device) for k, v in saved.get("fisher", {}).items()}
        self.anchor = {k: v.to(device) for k, v in saved.get("anchor", {}).items()}

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        task = model(**batch).loss
        penalty = ewc_penalty(self.params, self.fisher, self.anchor, self.config.ewc_lambda).to(task.device)
        return LossOutput(task + penalty, {"ce": float(task.detach()), "ewc": float(penalty.detach())})

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not params:
            return
        generator = torch.Generator().manual_seed(torch.initial_seed() % (2**63))  # leaves the global RNG alone
        fresh = fisher_diagonal(model, records, self.collate_fn, params, self.config.fisher_samples,
                                self.config.fisher_batch_size, self.config.fisher, generator)
        state = store(model).setdefault("ewc", {"fisher": {}, "anchor": {}})
        gamma = self.config.gamma
        running = {name: gamma * value for name, value in state["fisher"].items()}
        for name, value in fresh.items():
            running[name] = running[name] + value if name in running else value
        state["fisher"] = running
        state["anchor"] = {**state["anchor"], **{n: p.detach().float().clone() for n, p in params.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": {k: v.cpu() for k, v in self.fisher.items()},
                "anchor": {k: v.cpu() for k, v in self.anchor.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.params.values())).device if self.params else "cpu"
        self.fisher = {k: v.to(device) for k, v in state.get("fisher", {}).items()}
        self.anchor = {k: v.to(device) for k, v in state.get("anchor", {}).items()}
