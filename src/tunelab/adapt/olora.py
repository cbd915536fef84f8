"""O-LoRA: a new LoRA per domain, kept orthogonal to the earlier domains' LoRA subspaces.

Idea (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning",
arXiv:2310.14152): each domain t learns its own low-rank update B_t A_t; the rows of A_t span the
input subspace the update reads. Keeping the new A orthogonal to the old ones means the new update
barely reacts to inputs in the directions the old updates use, so earlier domains are not disturbed:

    L = L_task + λ Σ_{layers} Σ_{s < t} ‖ A_t A_sᵀ ‖_F²        (A ∈ ℝ^{r×d_in}, so A_t A_sᵀ ∈ ℝ^{r×r})

All adapters stay active (their updates add, h = W x + Σ_s B_s A_s x); only the newest trains.

Code map: every stage adds a LoRA through its stage ``method:`` — the runner names the adapter after
the stage and trains only it. ``setup`` finds that adapter (:func:`~tunelab.adapt.store.trainable_adapter`)
and, in every LoRA layer, pairs its ``lora_A[new].weight`` with each earlier finished adapter's;
:func:`orthogonality_penalty` is the sum above; ``on_stage_end`` appends the adapter to the finished
list in the model's cross-stage store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tunelab.adapt.store import store, trainable_adapter
from tunelab.errors import ConfigError
from tunelab.objectives.sft import SFTObjective, SFTOptions
from tunelab.train.objective import LossOutput


class OLoRAOptions(SFTOptions):
    """Options of the ``olora`` objective."""

    orth_lambda: float = Field(0.5, ge=0, description="λ: weight of the orthogonality penalty.")


def orthogonality_penalty(pairs: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]]) -> torch.Tensor:
    """``Σ_pairs Σ_old ‖A_new A_oldᵀ‖_F²`` for ``[(A_new (r, d), [A_old (r', d), ...]), ...]``."""
    total = torch.zeros(())
    for new, olds in pairs:
        for old in olds:
            total = total + ((new @ old.detach().T) ** 2).sum()  # (r, r')
    return total


def lora_pairs(model: nn.Module, new: str, old: Sequence[str]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """``(A_new, [A_old...])`` of every LoRA layer that holds adapter ``new``."""
    pairs = []
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and new in lora_a:
            olds = [lora_a[name].weight for name in old if name in lora_a]
            if olds:
                pairs.append((lora_a[new].weight, olds))
    return pairs


class OLoRAObjective(SFTObjective):
    """``olora``: SFT loss + λ·Σ‖A_new A_oldᵀ‖² against the LoRAs of earlier stages."""

    config_class = OLoRAOptions

    def __init__(self, config=None, **options: Any) -> None:
        super().__init__(config, **options)
        self.adapter: str | None = None
        self.pairs: list = []

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        super().setup(model, accelerator)
        self.adapter = trainable_adapter(model)
        finished = store(model).get("olora", [])
        if self.adapter is None or self.adapter in finished:
            raise ConfigError("objective olora needs a new LoRA adapter per stage: give every stage "
                              "`method: {name: lora, ...}` (the runner adds it under the stage's name)")
        self.pairs = lora_pairs(model, self.adapter, finished)

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        task = model(**batch).loss
        if not self.pairs:
            return LossOutput(task, {"ce": float(task.detach())})
        penalty = orthogonality_penalty(self.pairs).to(task.device)
        return LossOutput(task + self.config.orth_lambda * penalty,
                          {"ce": float(task.detach()), "orth": float(penalty.detach())})

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        if self.adapter is not None:
            store(model).setdefault("olora", []).append(self.adapter)
