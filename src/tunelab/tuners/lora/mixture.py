"""The learned mixture of LoRA experts: the ``lora_mixture`` method (config, gate variant, inject).

In the spirit of MoLE (Wu et al. 2024, "Mixture of LoRA Experts", arXiv:2404.13628), with a per-layer
rather than per-token gate: each layer gets ``k`` gate logits ``z`` over ``k`` frozen experts::

    h = W x + sum_i softmax(z)_i s_i B_i A_i x

How the code maps to it: the adapter is one concatenated LoRA of rank ``k r`` (expert ``i`` owns rank
block ``i``, smaller experts zero-padded) and :class:`MixtureVariant` scales block ``i`` by
``softmax(z)_i`` (``lora_gate[name]``, zeros at init: a uniform mixture). Only the gates train unless
``train_experts``. Gates are constant per layer, so the mixture merges exactly into ``W``. Building a
mixture from named experts on a model is :func:`tunelab.tuners.lora.multi_lora.mixture`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.tuners.base import tuner_layers
from tunelab.tuners.lora import lora
from tunelab.tuners.lora.lora import LoraConfig, LoraLayer


class LoraMixtureConfig(LoraConfig):
    """A gated mixture of ``k = len(experts)`` LoRA experts; ``r`` is the total rank (k blocks of r / k)."""

    method = "lora_mixture"

    experts: list[str] = Field(default_factory=lambda: ["expert_0", "expert_1"], min_length=1)
    """Names of the experts (recorded; mixture() copies their weights into this adapter's blocks)."""
    train_experts: bool = False
    """False (the learned mixture): only the per-layer gates train; True: experts train too."""
    use_dora: Literal[False] = False
    """Mixtures are of plain LoRA experts."""

    @model_validator(mode="after")
    def _ranks_split_into_blocks(self) -> LoraMixtureConfig:
        k = len(self.experts)
        for rank in (self.r, *self.rank_pattern.values()):
            if rank % k:
                raise ValueError(f"rank {rank} is not a multiple of the {k} experts; use r = k x expert rank")
        return self


class MixtureVariant:
    """The gate hook: block ``i`` of the adapter's rank is scaled by ``softmax(z)_i``."""

    def __init__(self, num_experts: int, train_experts: bool) -> None:
        self.num_experts = num_experts
        self.train_experts = train_experts

    def init(self, layer: LoraLayer, name: str) -> None:
        """Add ``lora_gate[name]`` = zeros(k) (a uniform mixture) and freeze the experts unless asked."""
        layer.add_container("lora_gate", nn.ParameterDict())
        weight = layer.lora_A[name].weight
        layer.lora_gate[name] = nn.Parameter(torch.zeros(self.num_experts, device=weight.device, dtype=weight.dtype))
        layer.lora_A[name].requires_grad_(self.train_experts)
        layer.lora_B[name].requires_grad_(self.train_experts)

    def channel_weights(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """``softmax(z)`` repeated over each expert's rank block: ``(k r_block,)``."""
        block = layer.lora_A[name].out_features // self.num_experts
        return layer.lora_gate[name].softmax(dim=0).repeat_interleave(block)

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        hidden = lora_A(layer.lora_dropout[name](x.to(lora_A.weight.dtype)))  # (..., k r_block)
        update = lora_B(hidden * self.channel_weights(layer, name)) * layer.scaling[name]  # (..., out)
        return result + update.to(result.dtype)

    def delta(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """``s B diag(softmax(z) per block) A`` as ``(out, in)``."""
        lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
        return (lora_B * self.channel_weights(layer, name)) @ lora_A * layer.scaling[name]

    @torch.no_grad()
    def merge(self, layer: LoraLayer, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        return base_weight + self.delta(layer, name).to(base_weight.dtype)

    @torch.no_grad()
    def unmerge(self, layer: LoraLayer, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        return base_weight - self.delta(layer, name).to(base_weight.dtype)


def inject(model: nn.Module, config: LoraMixtureConfig, adapter_name: str) -> list[str]:
    """Registered ``inject`` of ``lora_mixture``: LoRA's injection with the gate variant."""
    return lora.inject(model, config, adapter_name,
                       variant_factory=lambda: MixtureVariant(len(config.experts), config.train_experts))


def gate_weights(model: nn.Module, adapter_name: str = "mixture") -> dict[str, torch.Tensor]:
    """``{module path: softmax(z)}`` of a mixture adapter (which expert each layer uses)."""
    return {path: layer.lora_gate[adapter_name].detach().softmax(dim=0) for path, layer in tuner_layers(model)
            if adapter_name in getattr(layer, "lora_gate", {})}
