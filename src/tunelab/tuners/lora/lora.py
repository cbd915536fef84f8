"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv:2106.09685); rsLoRA scaling (Kalajdzievski 2023).

The idea: freeze the pretrained weight ``W`` and learn its update as a product of two thin matrices,
``dW = B A`` with rank ``r << min(in, out)``. Only ``A`` and ``B`` train, and after training ``B A``
can be folded into ``W``, so inference costs nothing extra.

    h = W x + s * B A dropout(x),    s = lora_alpha / r          (LoRA)
                                     s = lora_alpha / sqrt(r)    (rsLoRA, use_rslora=True)

``A`` starts kaiming-uniform (a = sqrt(5), as ``nn.Linear``), ``B`` starts at zero, so at init the
output equals the base model's. rsLoRA divides by sqrt(r) instead of r so that the update's scale
does not vanish as the rank grows ("A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
arXiv:2312.03732).

::

                x  (..., in)
                |
        +-------+---------+
        |                 |
        |            dropout(x)
        |                 |
    W x + b          A  (r, in)    <- kaiming-uniform, trains
    (frozen          |
     base_layer)     B  (out, r)   <- zeros, trains
        |                 |
        |             * scaling    (lora_alpha / r, or / sqrt(r))
        |                 |
        +-------(+)-------+
                 |
                 h  (..., out)

How the code maps to it: :class:`LoraLayer` wraps a ``nn.Linear`` or GPT-2 ``Conv1D`` (its weight is
stored transposed, ``(in, out)``: ``fan_in_fan_out``) as ``base_layer``; ``lora_A[name]`` and
``lora_B[name]`` are ``nn.Linear`` modules without bias, ``scaling[name]`` is ``s``. ``forward`` adds
the term of every active, unmerged adapter; ``merge`` adds ``s B A`` (transposed for ``Conv1D``) to
``W`` and ``unmerge`` subtracts it.

Extension points: a :class:`LoraVariant` per adapter changes how that adapter computes, merges and
stores extra parameters (DoRA adds a magnitude vector); a ``LoraLayer`` subclass overriding
``get_base_weight`` / ``set_base_weight`` supports quantized base layers (QLoRA). Both are passed to
:func:`inject`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Protocol

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn
from transformers.pytorch_utils import Conv1D

from tunelab.errors import MethodError
from tunelab.tuners import targets
from tunelab.tuners.base import BaseTunerLayer, MethodConfig


class LoraConfig(MethodConfig):
    """LoRA options (HF PEFT's names and meanings)."""

    method = "lora"

    r: int = Field(8, gt=0)
    """Rank of the update ``B A``."""
    lora_alpha: float = Field(8.0, gt=0)
    """Numerator of the scaling ``s`` (PEFT's default: 8, i.e. s = 1 at r = 8)."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input (training only)."""
    target_modules: list[str] | str | None = None
    """Names (suffix match), a regex (full match) or 'all-linear'; None: the architecture's default."""
    use_rslora: bool = False
    """Scale by lora_alpha / sqrt(r) instead of lora_alpha / r."""
    fan_in_fan_out: bool = False
    """PEFT compatibility: the layout is detected per layer (Conv1D stores (in, out)), as PEFT corrects it."""
    init_lora_weights: bool = True
    """True: B = 0 so the adapter starts as a no-op; False: B random too (tests)."""
    modules_to_save: list[str] | None = None
    """Modules (e.g. a new 'classifier' head) trained in full as a per-adapter copy and saved with it."""
    rank_pattern: dict[str, PositiveInt] = Field(default_factory=dict)
    """Per-module rank, keyed by a name or regex matched at the end of the module path (PEFT's rule)."""
    alpha_pattern: dict[str, PositiveFloat] = Field(default_factory=dict)
    """Per-module lora_alpha, matched like rank_pattern."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA, see tuners/lora/dora.py): a magnitude vector times the normalised W + s B A."""
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+ (see tuners/lora/loraplus.py): B trains at learning_rate x this ratio (16 in the paper); None: off."""


class LoraVariant(Protocol):
    """A hook that changes one adapter of a :class:`LoraLayer` (DoRA is LoRA plus a variant)."""

    def init(self, layer: LoraLayer, name: str) -> None:
        """Create the variant's extra parameters (after ``lora_A``/``lora_B`` exist)."""

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Return ``result`` (the output so far) with this adapter's contribution."""

    def merge(self, layer: LoraLayer, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """Return the new ``(out, in)`` base weight with this adapter folded in."""

    def unmerge(self, layer: LoraLayer, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """Return the ``(out, in)`` base weight with this adapter taken out again."""


def _features(base_layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear, a Conv1D (weight ``(in, out)``) or a look-alike,
    also behind other methods' wrappers."""
    base_layer = targets.base_of(base_layer)
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    return base_layer.in_features, base_layer.out_features


def _adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    # Adapters train in float32 even over half-precision or quantized bases (as PEFT's autocast).
    dtype = getattr(getattr(base_layer, "weight", None), "dtype", torch.float32)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class LoraLayer(BaseTunerLayer):
    """A Linear/Conv1D with named LoRA adapters: ``h = base(x) + sum_active s_n B_n A_n dropout_n(x)``."""

    adapter_attribute_names = ("lora_A", "lora_B", "lora_dropout")
    can_merge = True
    stackable = True  # the update adds to whatever the base layer (maybe another method's) returns

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(targets.base_of(base_layer), Conv1D)  # weight stored (in, out)
        self.in_features, self.out_features = _features(base_layer)
        self.lora_A = nn.ModuleDict()  # name -> Linear(in, r)
        self.lora_B = nn.ModuleDict()  # name -> Linear(r, out)
        self.lora_dropout = nn.ModuleDict()  # name -> Dropout or Identity
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, LoraVariant] = {}

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool = True,
                    variant: LoraVariant | None = None) -> None:
        weight = getattr(self.base_layer, "weight", None)
        factory = {"device": weight.device if weight is not None else None, "dtype": _adapter_dtype(self.base_layer)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        if init_lora_weights:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)  # B = 0: the adapter starts as a no-op
        if variant is not None:
            self.variants[name] = variant
            variant.init(self, name)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)
        self.variants.pop(name, None)

    def get_base_weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a view). Quantized subclasses dequantize here."""
        weight = self.base_layer.weight.data
        return weight.T if self.fan_in_fan_out else weight

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Write an ``(out, in)`` weight back into the base layer. Quantized subclasses requantize here."""
        target = self.base_layer.weight.data
        target.copy_(weight.T if self.fan_in_fan_out else weight)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s B A`` as ``(out, in)``."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]  # (out, r) @ (r, in)

    @torch.no_grad()
    def merge(self, names: list[str] | tuple[str, ...]) -> None:
        for name in names:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            weight = self.get_base_weight()
            variant = self.variants.get(name)
            merged = variant.merge(self, name, weight) if variant else weight + self.delta_weight(name).to(weight.dtype)
            self.set_base_weight(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.get_base_weight()
            variant = self.variants.get(name)
            restored = variant.unmerge(self, name, weight) if variant else weight - self.delta_weight(name).to(weight.dtype)
            self.set_base_weight(restored)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (..., out); holds merged adapters already
        if self.disabled:
            if self.merged_adapters:
                raise RuntimeError("adapters are merged: unmerge before disabling them")
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            variant = self.variants.get(name)
            if variant is not None:
                result = variant.forward(self, name, x, result)
                continue
            lora_A = self.lora_A[name]
            hidden = lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype)))  # (..., r)
            result = torch.add(result, self.lora_B[name](hidden).to(result.dtype), alpha=self.scaling[name])
        return result

    def extra_repr(self) -> str:
        ranks = {name: module.out_features for name, module in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={list(self.active_adapters)}"


def pattern_value(patterns: dict[str, float], path: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: the first key matching the end of ``path`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def inject(model: nn.Module, config: LoraConfig, adapter_name: str, *,
           layer_class: type[LoraLayer] = LoraLayer,
           variant_factory: Callable[[], LoraVariant] | None = None,
           linear_types: tuple[type[nn.Module], ...] = targets.LINEAR_TYPES) -> list[str]:
    """Add LoRA adapter ``adapter_name`` to every target; returns the wrapped paths.

    ``config.target_modules=None`` is replaced by the architecture's default, so the stored config
    says what was wrapped. Every target is checked before anything is replaced, so a failure leaves
    the model untouched.
    """
    targets.check_regex(config.target_modules)
    if config.target_modules is None:
        config.target_modules = targets.default_target_modules(model)
    paths = targets.find_targets(model, config.target_modules, linear_types)
    modules = {path: model.get_submodule(path) for path in paths}
    for path, module in modules.items():
        _check_target(path, module, layer_class, linear_types, variant_factory is not None)
    for path, module in modules.items():
        layer = module if isinstance(module, LoraLayer) else layer_class(module)
        if layer is not module:
            targets.replace_module(model, path, layer)
        r = int(pattern_value(config.rank_pattern, path, config.r))
        layer.add_adapter(adapter_name, r=r, lora_alpha=pattern_value(config.alpha_pattern, path, config.lora_alpha),
                          lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                          init_lora_weights=config.init_lora_weights,
                          variant=variant_factory() if variant_factory else None)
    return paths


def _check_target(path: str, module: nn.Module, layer_class: type[LoraLayer],
                  linear_types: tuple[type[nn.Module], ...], variant: bool = False) -> None:
    stacked = module.base_layer if isinstance(module, LoraLayer) else module
    if variant and isinstance(stacked, BaseTunerLayer):
        # DoRA's norm (and a mixture's gate) read W itself, which another method's layer inside changes
        raise MethodError(f"module {path!r} is wrapped by {type(stacked).__name__}; a LoRA variant (DoRA, "
                          "mixture) computes from the bare base weight and cannot wrap another method, "
                          "so apply it first or use plain LoRA")
    if isinstance(module, LoraLayer):
        return
    if isinstance(module, BaseTunerLayer):
        targets.check_stack(path, module, layer_class)
        module = targets.base_of(module)
    if not isinstance(module, linear_types):
        raise MethodError(f"target {path!r} is a {type(module).__name__}; {layer_class.__name__} wraps "
                          f"{', '.join(t.__name__ for t in linear_types)} modules only, so narrow target_modules")

