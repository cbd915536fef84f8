"""Learning without Forgetting (LwF): distil from the model as it was before the stage.

Idea (Li & Hoiem 2016, "Learning without Forgetting", arXiv:1606.09282): no old data is kept; instead,
on the *new* stage's inputs, the model is asked to keep producing what the previous model produced,

    L = L_task(θ) + α · T² · KL(p_{θ_old}^T ‖ p_θ^T)     (per scored position, mean)

with p^T the temperature-softened next-token distribution and θ_old the weights at the end of the
previous stage (Hinton's soft targets; :func:`tunelab.distill.losses.forward_kl`).

Code map: ``on_stage_end`` snapshots the trainable parameters into the model's cross-stage store
(:mod:`tunelab.adapt.store`); the next stage's ``loss`` gets the teacher logits by a temporary swap —
the snapshot is copied into those parameters, one no-grad forward runs, the current values are
copied back — *before* the student forward, so autograd never sees modified weights. No second model
is held: the cost is one copy of the trainable parameters. Parameters that did not exist at the
snapshot (a stage's new adapter) keep their current values in the teacher pass. The first stage has
no snapshot and trains with the task loss alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tunelab import IGNORE_INDEX
from tunelab.adapt.store import store
from tunelab.distill.losses import forward_kl
from tunelab.objectives.sft import SFTObjective, SFTOptions
from tunelab.train.objective import LossOutput


class LwFOptions(SFTOptions):
    """Options of the ``lwf`` objective."""

    alpha: float = Field(1.0, ge=0, description="α: weight of the distillation term.")
    temperature: float = Field(2.0, gt=0, description="T: softmax temperature of the soft targets.")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of the trainable parameters, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def teacher_logits(model: nn.Module, params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor],
                   inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` with ``saved`` values swapped into ``params`` (restored before returning)."""
    current = {name: params[name].detach().clone() for name in saved if name in params}
    was_training = model.training
    model.eval()
    try:
        for name in current:
            params[name].data.copy_(saved[name])
        return model(**inputs).logits.detach()
    finally:
        for name, value in current.items():
            params[name].data.copy_(value)
        model.train(was_training)


class LwFObjective(SFTObjective):
    """``lwf``: SFT loss + α·T²·KL from the previous stage's model on this stage's inputs."""

    config_class = LwFOptions

    def __init__(self, config=None, **options: Any) -> None:
        super().__init__(config, **options)
        self.params: dict[str, nn.Parameter] = {}
        self.saved: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        super().setup(model, accelerator)
        self.params = dict(model.named_parameters())
        self.saved = {k: v.to(next(model.parameters()).device) for k, v in store(model).get("lwf", {}).items()}

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        teacher = teacher_logits(model, self.params, self.saved, inputs) if self.saved else None
        out = model(**batch)
        if teacher is None:
            return LossOutput(out.loss, {"ce": float(out.loss.detach())})
        mask = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1): logits at t predict labels at t+1
        kd = forward_kl(out.logits[:, :-1], teacher[:, :-1], self.config.temperature, mask)
        total = out.loss + self.config.alpha * kd
        return LossOutput(total, {"ce": float(out.loss.detach()), "lwf_kd": float(kd.detach())})

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        store(model)["lwf"] = {k: v.cpu() for k, v in snapshot(model).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"saved": {k: v.cpu() for k, v in self.saved.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.params.values())).device if self.params else "cpu"
        self.saved = {k: v.to(device) for k, v in state.get("saved", {}).items()}
