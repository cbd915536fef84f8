"""Multi-LoRA combination: weighted sums of named LoRA adapters, and a learned mixture of them.

LoRA adapters trained for different tasks are small weight deltas ``dW_i = s_i B_i A_i`` on the same
base, so they can be combined after training. Three tools, all over *named* adapters of one model:

1. :func:`combine` writes a new LoRA adapter from a weighted combination ``sum_i w_i dW_i``:

   ========  ===============================================================================
   ``cat``   exact, any ranks: ``A = [w_1 s_1 A_1; ...; w_k s_k A_k]`` (rows), ``B = [B_1 ... B_k]``
             (columns), rank ``sum r_i``; then ``B A = sum_i w_i s_i B_i A_i`` exactly.
   ``linear`` same ranks only (HF PEFT's "linear"): ``A = sum_i sqrt|w_i| sign(w_i) s_i A_i``,
             ``B = sum_i sqrt|w_i| B_i``; rank ``r``. Not the sum of deltas (cross terms ``B_i A_j``)
             unless the adapters share subspaces; cheap and keeps the rank.
   ``svd``   the exact sum ``D = sum_i w_i dW_i`` (dense, per layer) re-compressed to ``rank`` by
             truncated SVD (Eckart-Young: the best rank-``k`` approximation; the error is exactly the
             discarded singular values, ``||D - B A||_F^2 = sum_{j>k} sigma_j^2``). Factors are split
             evenly: ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T``.
   ``ties``  TIES-merging (Yadav et al. 2023, arXiv:2306.01708) on the dense deltas: keep each delta's
             top ``density`` fraction by magnitude, elect a sign per entry (sign of the weighted sum,
             or of the majority), average the weighted entries that agree with it; then ``svd``.
   ========  ===============================================================================

   The new adapter is an ordinary LoRA adapter (scaling 1; per-layer ranks in ``rank_pattern``), so it
   saves, loads, merges and exports to HF PEFT like any other.

2. :func:`set_weights` runs several adapters at once with weights: ``h = W x + sum_i w_i s_i B_i A_i x``
   (each layer's ``scaling`` becomes ``w_i s_i``; weights are not saved with the adapters).

3. :func:`mixture` adds a *learned mixture of LoRA experts* (in the spirit of MoLE, Wu et al. 2024,
   arXiv:2404.13628, with a per-layer rather than per-token gate): each layer gets a gate ``z`` of ``k``
   logits over ``k`` frozen experts, ``h = W x + sum_i softmax(z)_i s_i B_i A_i x``. Only the gates
   train. The mixture is its own registered method, ``lora_mixture`` (:mod:`~tunelab.tuners.lora.mixture`:
   config, gate variant, ``gate_weights``); it holds frozen copies of the
   experts as one concatenated LoRA of rank ``k r`` (expert ``i`` owns rank block ``i``, smaller experts
   zero-padded) and scales block ``i`` by ``softmax(z)_i``. Gates are constant per layer, so the
   mixture merges exactly into ``W``.

Only plain LoRA adapters combine (DoRA's delta depends on ``W`` non-linearly); heads in
``modules_to_save`` do not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners import core
from tunelab.tuners.base import tuner_layers
from tunelab.tuners.lora import lora
from tunelab.tuners.lora.lora import LoraConfig, LoraLayer
from tunelab.tuners.lora.mixture import LoraMixtureConfig, gate_weights

COMBINATIONS = ("cat", "linear", "svd", "ties")


# ------------------------------------------------------------------------------------------ helpers


def _lora_configs(model: nn.Module, names: Sequence[str]) -> dict[str, LoraConfig]:
    """The configs of ``names``, each a plain LoRA adapter; MethodError otherwise."""
    configs = core.adapters(model)
    if not names:
        raise MethodError("no adapters to combine; pass the names of LoRA adapters on the model")
    for name in names:
        if name not in configs:
            raise MethodError(f"unknown adapter {name!r}; the model has: {', '.join(configs) or 'none'}")
        config = configs[name]
        if not isinstance(config, LoraConfig) or config.use_dora or config.method == "lora_mixture":
            raise MethodError(f"adapter {name!r} ({config.method}) is not a plain LoRA adapter; "
                              "only LoRA adapters (no DoRA, no mixture) can be combined")
        if config.modules_to_save:
            raise MethodError(f"adapter {name!r} has modules_to_save {config.modules_to_save}; heads cannot be "
                              "combined, so combine adapters without modules_to_save")
    return {name: configs[name] for name in names}


def _layers(model: nn.Module, names: Sequence[str]) -> list[tuple[str, LoraLayer]]:
    """LoRA layers holding at least one of ``names``; a merged one stops the combination."""
    layers = [(path, layer) for path, layer in tuner_layers(model)
              if isinstance(layer, LoraLayer) and any(name in layer.lora_A for name in names)]
    if any(layer.merged_adapters for _, layer in layers):
        raise MethodError("adapters are merged into the base weights; call tuners.unmerge(model) first")
    return layers


def base_scaling(config: LoraConfig, path: str, rank: int) -> float:
    """``s`` of one layer from the adapter's config (``lora_alpha / r`` or ``/ sqrt(r)``, patterns applied)."""
    alpha = lora.pattern_value(config.alpha_pattern, path, config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _parts(layer: LoraLayer, names: Sequence[str], weights: Sequence[float]):
    """``[(A (r, in), B (out, r), s, w)]`` of the adapters this layer holds (detached float copies)."""
    return [(layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach(), layer.scaling[n], w)
            for n, w in zip(names, weights, strict=True) if n in layer.lora_A]


def _new_config(template: LoraConfig, ranks: dict[str, int], method_options: dict | None = None,
                config_class: type[LoraConfig] = LoraConfig) -> LoraConfig:
    """A config with scaling 1 on every path: ``r`` = the most common rank, others in patterns."""
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    r = max(counts, key=lambda rank: (counts[rank], rank))
    pattern = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    options = {"r": r, "lora_alpha": float(r), "lora_dropout": template.lora_dropout,
               "target_modules": sorted(ranks), "use_rslora": False, "rank_pattern": pattern,
               "alpha_pattern": {key: float(value) for key, value in pattern.items()},
               "loraplus_lr_ratio": template.loraplus_lr_ratio, **(method_options or {})}
    return config_class(**options)


@torch.no_grad()
def _write(model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for path, (lora_A, lora_B) in factors.items():
        layer = model.get_submodule(path)
        layer.lora_A[name].weight.copy_(lora_A)  # (r, in)
        layer.lora_B[name].weight.copy_(lora_B)  # (out, r)


# ------------------------------------------------------------------------------------ combinations


def _cat(parts) -> tuple[torch.Tensor, torch.Tensor]:
    lora_A = torch.cat([w * s * A for A, _, s, w in parts], dim=0)  # (sum r_i, in)
    lora_B = torch.cat([B for _, B, _, _ in parts], dim=1)  # (out, sum r_i)
    return lora_A, lora_B


def _linear(parts, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = {A.shape[0] for A, _, _, _ in parts}
    if len(ranks) > 1:
        raise MethodError(f"combination 'linear' needs equal ranks, but {path!r} has ranks {sorted(ranks)}; "
                          "use combination='cat' or 'svd'")
    lora_A = sum(math.copysign(math.sqrt(abs(w)), w) * s * A for A, _, s, w in parts)  # (r, in)
    lora_B = sum(math.sqrt(abs(w)) * B for _, B, _, w in parts)  # (out, r)
    return lora_A, lora_B


def _svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (out, in): ``B = U sqrt(S)``, ``A = sqrt(S) V^T``."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)  # double: exact-as-possible truncation
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    return (root[:, None] * Vh[:k]).to(delta.dtype), (U[:, :k] * root).to(delta.dtype)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: zero all but the ``density`` fraction of entries with the largest magnitude."""
    keep = max(1, math.ceil(density * delta.numel()))
    if keep >= delta.numel():
        return delta
    threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES-merging of dense deltas: trim, elect sign, disjoint mean (HF PEFT's ``ties`` rule)."""
    stacked = torch.stack([w * trim(d, density) for d, w in zip(deltas, weights, strict=True)])  # (k, out, in)
    signs = stacked.sign()
    elected = (stacked.sum(0) if majority_sign_method == "total" else signs.sum(0)).sign()  # (out, in)
    agree = (signs == elected) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp_min(1)


def combine(model: nn.Module, adapters: Sequence[str], weights: Sequence[float] | None = None,
            adapter_name: str = "combined", combination: str = "cat", rank: int | None = None,
            density: float = 0.5, majority_sign_method: Literal["total", "frequency"] = "total") -> nn.Module:
    """Add LoRA adapter ``adapter_name`` = a weighted combination of LoRA ``adapters`` (see module doc).

    Args:
        model: a model holding the LoRA adapters named in ``adapters``.
        adapters: names to combine; weights: one per adapter (default: all 1.0).
        adapter_name: the new adapter's name (it is added, not activated).
        combination: ``"cat"`` (exact), ``"linear"`` (same ranks), ``"svd"``, ``"ties"``.
        rank: target rank of ``svd`` / ``ties`` (default: the largest input rank at each layer).
        density: fraction of entries TIES keeps per delta; majority_sign_method: TIES's sign election.

    Returns:
        The model, in place.
    """
    configs = _lora_configs(model, adapters)
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise MethodError(f"got {len(weights)} weights for {len(adapters)} adapters; pass one weight per adapter")
    if combination not in COMBINATIONS:
        raise MethodError(f"unknown combination {combination!r}; use one of: {', '.join(COMBINATIONS)}")
    if (rank is not None and rank <= 0) or not 0 < density <= 1:
        raise MethodError(f"invalid rank={rank} or density={density}; use rank > 0 and 0 < density <= 1")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, layer in _layers(model, adapters):
        parts = _parts(layer, adapters, weights)
        if combination == "cat":
            factors[path] = _cat(parts)
        elif combination == "linear":
            factors[path] = _linear(parts, path)
        else:
            deltas = [s * (B @ A) for A, B, s, _ in parts]  # (out, in) each
            target = rank or max(A.shape[0] for A, _, _, _ in parts)
            if combination == "svd":
                merged = sum(w * d for d, (_, _, _, w) in zip(deltas, parts, strict=True))
            else:
                merged = ties(deltas, [w for *_, w in parts], density, majority_sign_method)
            factors[path] = _svd(merged, target)
    config = _new_config(configs[adapters[0]], {path: A.shape[0] for path, (A, _) in factors.items()})
    core.add_adapter(model, config, adapter_name)
    _write(model, adapter_name, factors)
    return model


# --------------------------------------------------------------------------------- weighted active


def set_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Run exactly the adapters in ``weights``, each scaled: ``h = W x + sum_i w_i s_i B_i A_i x``.

    The weight multiplies each layer's LoRA scaling (recomputed from the config, so calling again with
    ``1.0`` restores it). Weights are not saved with the adapters.
    """
    configs = _lora_configs(model, list(weights))
    layers = _layers(model, list(weights))
    for path, layer in layers:
        for name, weight in weights.items():
            if name in layer.lora_A:
                rank = layer.lora_A[name].out_features
                layer.scaling[name] = base_scaling(configs[name], path, rank) * float(weight)
    core.set_active(model, list(weights))


# ---------------------------------------------------------------------------------- learned mixture


def mixture(model: nn.Module, experts: Sequence[str], adapter_name: str = "mixture") -> nn.Module:
    """Add and activate a learned mixture of the LoRA ``experts``; only its per-layer gates train.

    The experts' weights are copied (scaling folded into ``A``) into the mixture's rank blocks, and the
    experts themselves are frozen (they stay on the model, inactive). Train as usual afterwards.
    """
    configs = _lora_configs(model, experts)
    k = len(experts)
    factors, ranks = {}, {}
    for path, layer in _layers(model, experts):
        block = max(layer.lora_A[n].out_features for n in experts if n in layer.lora_A)
        lora_A = torch.zeros(k * block, layer.in_features)  # (k r, in); missing experts stay zero
        lora_B = torch.zeros(layer.out_features, k * block)  # (out, k r)
        for index, name in enumerate(experts):
            if name in layer.lora_A:
                A, B = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
                rows = slice(index * block, index * block + A.shape[0])
                lora_A[rows], lora_B[:, rows] = layer.scaling[name] * A, B
        factors[path], ranks[path] = (lora_A, lora_B), k * block
    config = _new_config(configs[experts[0]], ranks, {"experts": list(experts)}, LoraMixtureConfig)
    core.add_adapter(model, config, adapter_name)
    _write(model, adapter_name, factors)
    for _, layer in _layers(model, experts):
        for name in experts:
            if name in layer.lora_A:
                layer.lora_A[name].requires_grad_(False)
                layer.lora_B[name].requires_grad_(False)
    core.set_active(model, [adapter_name])
    return model


__all__ = ["COMBINATIONS", "base_scaling", "combine", "gate_weights", "mixture", "set_weights", "ties", "trim"]
