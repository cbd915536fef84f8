"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) and the generic insertion mechanism.

A bottleneck adapter is a small residual MLP inserted into every transformer block, applied to the
output of a sub-layer before the block adds its own residual:

    h' = h + s · W_up act(W_down h + b_down) + b_up       W_down: m × d,  W_up: d × m,  m = d / reduction_factor

- **Houlsby** ("Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751): two adapters per
  block, after the attention sub-layer and after the feed-forward sub-layer.
- **Pfeiffer** ("AdapterFusion", arXiv:2005.00247): one adapter per block, after the feed-forward
  sub-layer only; half the parameters, about the same quality.

``W_up`` and ``b_up`` start at zero, so the adapter starts as the identity (the model equals the base).

Generic insertion (no per-architecture code)::

    model ── ModuleList of identical blocks  (found by structure: model.layers / encoder.layer / h / blocks)
               block i ── attention sub-module (first descendant named *attn* / *attention* with a Linear)
               │            └── its last Linear ............ AdapterLayer  <- Houlsby "attention" adapter
               └── last Linear outside attention modules ... AdapterLayer  <- both placements, "ffn" adapter

The two Linears found are the sub-layers' *output projections*: Llama ``self_attn.o_proj`` /
``mlp.down_proj``, BERT ``attention.output.dense`` / ``output.dense``, GPT-2 ``attn.c_proj`` /
``mlp.c_proj``, T5 ``SelfAttention.o`` / ``DenseReluDense.wo``, OPT ``out_proj`` / ``fc2``. Their output
is exactly the sub-layer's contribution before dropout, residual add and layer norm, which is where
the papers put the adapter. Each is replaced by an :class:`AdapterLayer` that keeps it as
``base_layer`` (the usual wrapper contract) and runs ``h + Σ_active delta_n(h)`` on its output. The
options ``attention_output`` / ``ffn_output`` name the modules explicitly for unusual blocks (MoE).

The same mechanism carries Compacter (``compacter.py``: the adapter's projections are PHM layers)
and AdapterDrop (``adapterdrop.py``: an :class:`AdapterLayer` knows its block index and skips its
adapters below a threshold). Adapters are non-linear, so they cannot be merged into the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners import targets
from tunelab.tuners.base import BaseTunerLayer, MethodConfig

ATTENTION_MARKERS = ("attn", "attention")  # a block child whose name contains one of these is attention
POSITIONS = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity,
}


class AdapterPlacementConfig(MethodConfig):
    """Options shared by the methods that insert adapters into blocks (bottleneck, Compacter)."""

    layers_to_transform: list[int] | None = None
    """Block indices that get adapters (PEFT's name); None: every block."""
    attention_output: str | None = None
    """Override: the attention output projection, relative to a block (e.g. 'self_attn.o_proj')."""
    ffn_output: str | None = None
    """Override: the feed-forward output projection, relative to a block (e.g. 'mlp.down_proj')."""
    adapterdrop_train_layers: int = Field(0, ge=0)
    """AdapterDrop in training: each step skips the adapters of the n lowest blocks, n ~ U{0..this}; 0: off."""
    modules_to_save: list[str] | None = None
    """Modules (e.g. a new 'classifier' head) trained in full as a per-adapter copy and saved with it."""


class BottleneckConfig(AdapterPlacementConfig):
    """Bottleneck adapter options (AdapterHub's names where PEFT has none)."""

    method = "bottleneck"

    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    """houlsby: after attention and after the feed-forward block; pfeiffer: after the feed-forward only."""
    reduction_factor: float = Field(16.0, gt=0)
    """Bottleneck width m = hidden / reduction_factor (at least 1)."""
    non_linearity: Literal["relu", "gelu", "swish", "silu", "tanh", "identity"] = "relu"
    """The activation between the down and up projections."""
    residual: bool = True
    """True: h + adapter(h) (identity at init); False: the adapter output replaces h (ablation only)."""
    scaling: float = 1.0
    """Multiplier s of the adapter's output."""

    @model_validator(mode="after")
    def _nonzero_scaling(self) -> BottleneckConfig:
        if self.scaling == 0:
            raise ValueError("scaling=0 switches the adapter off; use a non-zero scaling")
        return self


def bottleneck_width(hidden: int, reduction_factor: float) -> int:
    return max(1, int(hidden // reduction_factor))


class BottleneckAdapter(nn.Module):
    """``delta(h) = s · up(act(down(h)))`` (minus ``h`` without residual); ``up`` starts at zero."""

    def __init__(self, hidden: int, width: int, non_linearity: str, scaling: float, residual: bool) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, width)  # (d) -> (m)
        self.activation = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(width, hidden)  # (m) -> (d)
        self.scaling, self.residual = scaling, residual
        nn.init.normal_(self.down.weight, std=1e-2)  # Houlsby: near-zero init
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # up = 0: the adapter starts as the identity
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.up(self.activation(self.down(h))) * self.scaling  # (..., d)
        return out if self.residual else out - h


class DropSampler:
    """AdapterDrop in training: one ``n ~ U{0..max_layers}`` per forward pass, shared by an adapter's layers."""

    def __init__(self, max_layers: int) -> None:
        self.max_layers = max_layers
        self.current = 0

    def resample(self) -> None:
        # torch's RNG: deterministic for a seed, and replayed by activation checkpointing.
        self.current = int(torch.randint(0, self.max_layers + 1, ()).item())


class AdapterLayer(BaseTunerLayer):
    """A sub-layer output projection followed by named adapters: ``y = base(x); y + Σ_active delta_n(y)``.

    ``layer_index`` is the block index (AdapterDrop skips blocks below ``drop_first`` and, in
    training, below the sampled ``DropSampler.current``); ``parallel_names`` runs one adapter per
    batch slice (``adapterdrop.parallel_adapters``).
    """

    adapter_attribute_names = ("adapters",)
    stackable = True  # adapts whatever its base layer (maybe another method's) returns

    def __init__(self, base_layer: nn.Module, layer_index: int, position: str) -> None:
        super().__init__(base_layer)
        self.layer_index, self.position = layer_index, position
        self.adapters = nn.ModuleDict()  # name -> module mapping h (..., d) to a delta (..., d)
        self.samplers: dict[str, DropSampler] = {}  # name -> shared sampler (AdapterDrop in training)
        self.sampler_leader: set[str] = set()  # adapters for which this layer resamples (lowest layer)
        self.drop_first = 0  # inference AdapterDrop: no adapter runs in blocks < drop_first
        self.parallel_names: tuple[str, ...] | None = None

    def add_adapter(self, name: str, adapter: nn.Module, sampler: DropSampler | None, leader: bool) -> None:
        weight = self.base_layer.weight
        self.adapters[name] = adapter.to(weight.device)
        if sampler is not None:
            self.samplers[name] = sampler
            if leader:
                self.sampler_leader.add(name)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.samplers.pop(name, None)
        self.sampler_leader.discard(name)

    def runs(self, name: str) -> bool:
        """Whether adapter ``name`` runs in this block now (AdapterDrop may skip it)."""
        if self.layer_index < self.drop_first:
            return False
        sampler = self.samplers.get(name)
        if sampler is not None and self.training:
            if name in self.sampler_leader:
                sampler.resample()  # the adapter's lowest layer runs first in every forward pass
            return self.layer_index >= sampler.current
        return True

    def _run_adapters(self, h: torch.Tensor, names: tuple[str, ...] | list[str]) -> torch.Tensor:
        running = [name for name in names if self.runs(name)]
        if not running:
            return h
        x = h.to(torch.float32) if h.dtype not in (torch.float32, torch.float64) else h
        delta = sum(self.adapters[name](x) for name in running)  # (..., d)
        return h + delta.to(h.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)  # (..., d): the sub-layer's output
        if self.disabled:
            return h
        if self.parallel_names is not None:
            return self._parallel(h)
        return self._run_adapters(h, self.active_adapters)

    def _parallel(self, h: torch.Tensor) -> torch.Tensor:
        names = self.parallel_names
        if self.layer_index < self.drop_first:
            return h  # below the shared prefix: one copy of the batch, no adapters
        if h.shape[0] % len(names):
            raise MethodError(f"parallel adapters: batch {h.shape[0]} is not a multiple of {len(names)} adapters; "
                              "run the model inside tuners.parallel_adapters only")
        chunks = h.chunk(len(names), dim=0)  # n x (B, ..., d): slice j belongs to adapter j
        return torch.cat([self._run_adapters(chunk, [name]) for chunk, name in zip(chunks, names, strict=True)], dim=0)

    def extra_repr(self) -> str:
        return f"block={self.layer_index}, position={self.position}, adapters={list(self.adapters)}"


# --------------------------------------------------------------------------------------------- discovery


def find_blocks(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Every stack of transformer blocks: a ``ModuleList`` of modules of one class that hold Linears.

    Returns one list of ``(path, block)`` per stack (encoder-decoder models have two), outermost first.
    """
    stacks: list[list[tuple[str, nn.Module]]] = []
    _find_stacks(model, "", stacks)
    if not stacks:
        raise MethodError(f"found no stack of transformer blocks in {type(model).__name__} (a ModuleList of "
                          "identical layers); adapters need one, use LoRA or (IA)³ for this model")
    return stacks


def _find_stacks(module: nn.Module, prefix: str, stacks: list) -> None:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, BaseTunerLayer):
            continue
        items = list(child) if isinstance(child, nn.ModuleList) else []
        if items and len({type(item) for item in items}) == 1 and any(
                targets.is_linear(m) for item in items for m in item.modules()):
            stacks.append([(f"{path}.{i}", item) for i, item in enumerate(items)])
        else:
            _find_stacks(child, path, stacks)


def _linears(module: nn.Module, prefix: str = "") -> Iterator[str]:
    """Relative paths of Linear/Conv1D modules (or wrappers of them) in registration order."""
    for path, child in targets.candidate_modules(module):
        if targets.is_linear(child):
            yield f"{prefix}{path}"


def _is_attention(path: str) -> bool:
    return any(marker in part.lower() for part in path.split(".") for marker in ATTENTION_MARKERS)


def sublayer_outputs(block: nn.Module, attention_output: str | None = None,
                     ffn_output: str | None = None) -> dict[str, str | None]:
    """``{"attention": path, "ffn": path}`` of a block's output projections (relative paths)."""
    linears = list(_linears(block))
    attention = attention_output or next(
        (_last_in(linears, path) for path, _ in targets.candidate_modules(block)
         if _is_attention(path.rsplit(".", 1)[-1]) and _last_in(linears, path)), None)
    ffn = ffn_output or next((path for path in reversed(linears) if not _is_attention(path)), None)
    for role, path in (("attention", attention_output), ("ffn", ffn_output)):
        if path is not None and path not in linears:
            raise MethodError(f"{role}_output {path!r} is not a Linear in the block; choose one of: "
                              f"{', '.join(linears[:targets.MAX_LISTED_NAMES])}")
    return {"attention": attention, "ffn": ffn}


def _last_in(linears: list[str], prefix: str) -> str | None:
    inside = [path for path in linears if path.startswith(prefix + ".")]
    return inside[-1] if inside else None


def insertion_points(model: nn.Module, config: AdapterPlacementConfig,
                     positions: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """``(module path, block index, position)`` of every output projection that gets an adapter."""
    points = []
    for stack in find_blocks(model):
        chosen = config.layers_to_transform
        if chosen is not None and any(i < 0 or i >= len(stack) for i in chosen):
            raise MethodError(f"layers_to_transform {chosen} is out of range; the model has {len(stack)} blocks "
                              f"(0..{len(stack) - 1})")
        for index, (block_path, block) in enumerate(stack):
            if chosen is not None and index not in chosen:
                continue
            outputs = sublayer_outputs(block, config.attention_output, config.ffn_output)
            for position in positions:
                if outputs[position] is None:
                    raise MethodError(f"block {block_path!r} has no {position} output projection; use placement "
                                      f"'pfeiffer' (feed-forward only) or name it with {position}_output=...")
                points.append((f"{block_path}.{outputs[position]}", index, position))
    return points


# ------------------------------------------------------------------------------------------------ inject


def insert(model: nn.Module, config: AdapterPlacementConfig, adapter_name: str, positions: tuple[str, ...],
           make_adapter: Callable[[int, str], nn.Module]) -> list[str]:
    """Insert adapter ``adapter_name`` at ``positions`` of every block; ``make_adapter(hidden, position)``.

    Every insertion point is checked before the model changes, so a failure leaves it untouched.
    """
    points = insertion_points(model, config, positions)
    for path, _, _ in points:
        module = model.get_submodule(path)
        if not isinstance(module, AdapterLayer):
            targets.check_stack(path, module, AdapterLayer)
    adapters = {}
    for path, _, position in points:
        module = model.get_submodule(path)
        with torch.device(module.weight.device):  # built in place: moving would unshare shared parameters
            adapters[path] = make_adapter(_hidden(module), position)
    sampler = DropSampler(config.adapterdrop_train_layers) if config.adapterdrop_train_layers else None
    for order, (path, index, position) in enumerate(points):
        module = model.get_submodule(path)
        layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module, index, position)
        if layer is not module:
            targets.replace_module(model, path, layer)
        layer.add_adapter(adapter_name, adapters[path], sampler, leader=order == 0)
    return [path for path, _, _ in points]


def _hidden(module: nn.Module) -> int:
    base = targets.base_of(module)
    return base.weight.shape[1] if not isinstance(base, nn.Linear) else base.out_features  # Conv1D: (in, out)


def inject(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> list[str]:
    """Add bottleneck adapter ``adapter_name`` (Houlsby or Pfeiffer placement); returns the wrapped paths."""
    def make(hidden: int, position: str) -> BottleneckAdapter:
        return BottleneckAdapter(hidden, bottleneck_width(hidden, config.reduction_factor), config.non_linearity,
                                 config.scaling, config.residual)

    return insert(model, config, adapter_name, POSITIONS[config.placement], make)
