"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

The idea: split each weight into a *magnitude* per output feature and a *direction*, and let LoRA
move only the direction while a trainable vector sets the magnitude. Full fine-tuning changes the two
in very different proportions from LoRA; decoupling them closes much of the gap at LoRA's cost.

    W' = m * (W + s B A) / ||W + s B A||_row           m: (out,), trains; norm per output row
    h  = W' x + b

``m`` starts at ``||W + s B A||_row`` (= ``||W||_row`` with ``B = 0``), so the adapter starts as a no-op.
Section 4.3 of the paper treats the norm as a constant in backpropagation (``.detach()``): the
gradient reaches ``m`` and, through the direction's numerator, ``A`` and ``B``, but not the norm.

::

          x (..., in)
          |
     +----+-----------------+
     |                      |
   W x            s B A dropout(x)          W, b frozen; A (r, in), B (out, r), m (out,) train
     |                      |
     +---------(+)----------+
                |                          g = m / ||W + s B A||_row   (detached norm)
          b + g * (.)                      (DoraScale: keeps h, not u, for backward)

How the code maps to it. DoRA is LoRA plus a :class:`DoraVariant` per adapter and layer (HF PEFT's
design): the variant adds ``lora_magnitude_vector[name]`` (PEFT's name, so PEFT's file keys match)
and computes ``h = b + g * ((result - b) + s B A x)`` where ``result`` is the output so far (the base
output plus adapters earlier in the active list, exactly as PEFT composes them). With dropout in
training, PEFT's rule: ``h = result + (g - 1) W d + g s B A d`` with ``d = dropout(x)``.
Without dropout the last step is one autograd function, :class:`DoraScale`, that keeps the layer's
output for backward instead of ``u = result + s B A x`` (``dL/dm`` needs ``u - b = (h - b) / g``): the
next operation usually keeps ``h`` anyway, so DoRA then adds no activation memory over LoRA.

The norm without the dense ``(out, in)`` temporary (HF PEFT materialises ``W + s B A`` and an
identity matrix every forward). Row ``i`` of ``W + s B A`` squared:

    ||w_i||^2 + 2 s (B (A W^T))_ii + s^2 (B (A A^T) B^T)_ii

``||w_i||^2`` is cached (``W`` is frozen; the cache is keyed on the weight's storage and version
counter), ``A W^T`` is ``(r, out)`` and ``A A^T`` is ``(r, r)``: one pass over ``W`` and nothing of
size ``out x in`` is allocated. The full norm is also cached while ``A``, ``B`` and ``W`` do not change
(evaluation). :func:`row_norm` picks the dense formula only for ranks near the layer size, where it
costs less.

Merge is exact: ``W <- g (W + s B A)`` with ``g`` from the weight without merged adapters; the
merge-time ``g`` is kept so that unmerge computes ``W = W' / g - s B A``. Config: ``tuners.apply(model,
"dora", ...)`` or ``use_dora=True`` on ``"lora"`` (same options as LoRA). PEFT files: ``peft_type: LORA``
with ``use_dora: true`` and ``<path>.lora_magnitude_vector`` tensors.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.tuners.base import tuner_layers
from tunelab.tuners.lora import lora
from tunelab.tuners.lora.lora import LoraConfig, LoraLayer

DENSE_RANK_FRACTION = 0.25  # r above this fraction of min(in, out): the dense norm does less work
MIN_RECONSTRUCT_FACTOR = 1e-3  # |g| below this anywhere: keep u for backward instead of dividing by g


class DoraConfig(LoraConfig):
    """DoRA options: LoRA's (HF PEFT names); ``use_dora`` is always on."""

    method = "dora"

    use_dora: Literal[True] = True
    """Always True for the 'dora' method (use method 'lora' for plain LoRA)."""


@torch.no_grad()
def row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
             weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``||W + s B A||`` per output row, ``(out,)``, without gradient (the paper's detached norm).

    Args:
        weight: ``(out, in)`` base weight (a transposed view is fine).
        lora_A: ``(r, in)``; lora_B: ``(out, r)``; scaling: ``s``.
        weight_sq: cached ``||w_i||^2`` ``(out,)``; computed when ``None``.
    """
    weight = weight.to(lora_A.dtype)
    rank = lora_A.shape[0]
    if rank > DENSE_RANK_FRACTION * min(weight.shape):
        return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)  # (out, in) temporary
    if weight_sq is None:
        weight_sq = weight.pow(2).sum(dim=1)  # (out,)
    projected = lora_A @ weight.T  # (r, out) = A W^T
    cross = (lora_B * projected.T).sum(dim=1)  # (out,) = diag(B A W^T)
    quadratic = ((lora_B @ (lora_A @ lora_A.T)) * lora_B).sum(dim=1)  # (out,) = ||(B A)_i||^2
    return (weight_sq + 2 * scaling * cross + scaling**2 * quadratic).clamp_min(0).sqrt()


def _tensor_key(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tensor._version, tensor.device, tensor.dtype


class DoraScale(torch.autograd.Function):
    """``h = g u + (1 - g) b`` with ``u = result + s lora_out`` and ``g = m / norm`` (norm detached).

    Backward needs ``u - b`` only for ``dL/dm = sum_tokens dL/dh (u - b) / norm``. Autograd's
    ``addcmul`` would keep ``u``, one ``(..., out)`` tensor per layer. Here the *output* ``h`` is kept
    instead and ``u - b = (h - b) / g`` is rebuilt in backward: when the next operation also keeps
    ``h`` (attention keeps its q/k/v, SiLU and GELU their input, the gated product both factors),
    the two share one tensor and DoRA costs no activation memory over LoRA in that layer. If some
    ``g`` is near zero (the division would lose precision) ``u`` is kept, as autograd would.
    A model that modifies a projection's output in place afterwards makes backward fail with
    PyTorch's "modified by an inplace operation" error: use dropout (the other path) there.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, lora_out: torch.Tensor, scaling: float, magnitude: torch.Tensor,
                norm: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        update = torch.add(result, lora_out, alpha=scaling)  # (..., out)
        g = magnitude / norm  # (out,)
        out = g * update if bias is None else torch.addcmul((1 - g) * bias, g, update)
        ctx.keep_output = bool((g.abs() >= MIN_RECONSTRUCT_FACTOR).all())
        ctx.scaling = scaling
        ctx.save_for_backward(out if ctx.keep_output else update, g, norm, bias)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kept, g, norm, bias = ctx.saved_tensors
        grad_magnitude = None
        if ctx.needs_input_grad[3]:
            shifted = kept if bias is None else kept - bias  # (..., out): h - b = g (u - b), or u - b
            grad_g = (grad * shifted).reshape(-1, grad.shape[-1]).sum(dim=0)  # (out,)
            # dL/dm = sum_t dL/dh (u - b) / norm; with h kept, divide the (out,) sum by g, not every token
            grad_magnitude = (grad_g / g if ctx.keep_output else grad_g) / norm
        grad_update = grad * g  # (..., out)
        grad_lora = grad_update * ctx.scaling if ctx.needs_input_grad[1] else None
        return (grad_update if ctx.needs_input_grad[0] else None), grad_lora, None, grad_magnitude, None, None


class DoraVariant:
    """The DoRA hook on one adapter of one :class:`~tunelab.tuners.lora.lora.LoraLayer`.

    Holds no parameters (the magnitude lives in ``layer.lora_magnitude_vector[name]``), only caches and
    the merge-time factor ``g``.
    """

    def __init__(self) -> None:
        self._weight_sq: tuple[tuple, torch.Tensor] | None = None  # (key, ||w_i||^2)
        self._norm: tuple[tuple, torch.Tensor] | None = None  # (key, ||W + s B A||_row)
        self.merge_factor: torch.Tensor | None = None  # (out,) g at merge time, for unmerge

    # ------------------------------------------------------------------------------- the norm
    def reference_weight(self, layer: LoraLayer) -> torch.Tensor:
        """The ``(out, in)`` base weight without merged adapters (PEFT: the norm uses the unmerged W)."""
        weight = layer.get_base_weight()
        if not layer.merged_adapters:
            return weight
        weight = weight.clone()
        for name in reversed(layer.merged_adapters):  # undo in reverse order; unmerge hooks are pure
            variant = layer.variants.get(name)
            weight = variant.unmerge(layer, name, weight) if variant else weight - layer.delta_weight(name).to(weight.dtype)
        return weight

    def weight_norm(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """``||W + s B A||`` per output row ``(out,)`` for adapter ``name``, detached, cached while unchanged."""
        lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
        scaling = layer.scaling[name]
        if layer.merged_adapters:  # rare: some adapter is folded in; recompute from the replayed weight
            return row_norm(self.reference_weight(layer), lora_A, lora_B, scaling)
        stored = layer.base_layer.weight
        weight_key = _tensor_key(stored)
        key = (weight_key, _tensor_key(lora_A), _tensor_key(lora_B), scaling)
        if self._norm is not None and self._norm[0] == key:
            return self._norm[1]
        weight = layer.get_base_weight()
        if self._weight_sq is None or self._weight_sq[0] != weight_key:
            with torch.no_grad():
                self._weight_sq = (weight_key, weight.to(lora_A.dtype).pow(2).sum(dim=1))
        norm = row_norm(weight, lora_A, lora_B, scaling, self._weight_sq[1])
        self._norm = (key, norm)
        return norm

    # ---------------------------------------------------------------------- LoraVariant protocol
    def init(self, layer: LoraLayer, name: str) -> None:
        """Add ``lora_magnitude_vector[name] = ||W + s B A||_row`` (the adapter starts as a no-op)."""
        layer.add_container("lora_magnitude_vector", nn.ParameterDict())
        norm = self.weight_norm(layer, name)
        layer.lora_magnitude_vector[name] = nn.Parameter(norm.clone())  # (out,)

    def factor(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """``g = m / ||W + s B A||_row`` ``(out,)``; gradient flows to ``m`` only."""
        return layer.lora_magnitude_vector[name] / self.weight_norm(layer, name)

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        dropout, scaling = layer.lora_dropout[name], layer.scaling[name]
        x = x.to(lora_A.weight.dtype)
        if isinstance(dropout, nn.Identity) or not layer.training:
            # b + g (result - b + s B A x): one fused op that keeps only its output for backward
            magnitude, norm = layer.lora_magnitude_vector[name], self.weight_norm(layer, name)  # (out,) each
            lora_out = lora_B(lora_A(x))  # (..., out), scaled inside
            bias = layer.base_layer.bias
            bias = None if bias is None else bias.to(norm.dtype)
            out = DoraScale.apply(result.to(norm.dtype), lora_out, scaling, magnitude, norm, bias)
            return out.to(result.dtype)
        g = self.factor(layer, name)  # (out,)
        dropped = dropout(x)
        base = F.linear(dropped, layer.get_base_weight().to(g.dtype))  # (..., out) W d, no bias
        # result + (g - 1) W d + g s B A d = (result - W d) + g (W d + s B A d)
        update = torch.add(base, lora_B(lora_A(dropped)), alpha=scaling)
        return torch.addcmul(result.to(g.dtype) - base, g, update).to(result.dtype)

    @torch.no_grad()
    def merge(self, layer: LoraLayer, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """``W' = g (W + s B A)``; the norm comes from the weight without merged adapters."""
        self.merge_factor = self.factor(layer, name).detach().clone()
        merged = self.merge_factor[:, None] * (base_weight.to(self.merge_factor.dtype) + layer.delta_weight(name))
        return merged.to(base_weight.dtype)

    @torch.no_grad()
    def unmerge(self, layer: LoraLayer, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """``W = W' / g - s B A`` with the merge-time ``g`` (pure: the factor is kept)."""
        factor = self.merge_factor[:, None]
        restored = base_weight.to(factor.dtype) / factor - layer.delta_weight(name)
        return restored.to(base_weight.dtype)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """LoRA's injection, with the DoRA variant where ``use_dora`` is set.

    Registered for ``dora`` (always set) and for ``lora`` (PEFT's ``use_dora=True`` flag), so
    ``lora`` needs no import of this module.
    """
    return lora.inject(model, config, adapter_name, variant_factory=DoraVariant if config.use_dora else None)


def magnitudes(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``{module path: m}`` of one DoRA adapter (for inspection and tests)."""
    return {path: layer.lora_magnitude_vector[adapter_name] for path, layer in tuner_layers(model)
            if adapter_name in getattr(layer, "lora_magnitude_vector", {})}
