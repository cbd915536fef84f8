"""(IA)³: learned vectors that rescale keys, values and feed-forward activations (Liu et al. 2022, T-Few).

"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv:2205.05638. The idea: instead of adding a weight update, learn one vector per adapted layer that
multiplies activations element-wise. For attention, the keys and values are rescaled; for the
feed-forward block, the intermediate activation (the input of the down projection) is:

    k' = l_k ⊙ (W_k x)          v' = l_v ⊙ (W_v x)            (output scaling, out features)
    y  = W_down (l_ff ⊙ h)                                      (input scaling, feedforward_modules)

The vectors start at ones, so at init the model is exactly the base. Because ``l ⊙ (W x) = (diag(l) W) x``
and ``W (l ⊙ h) = (W diag(l)) h``, an adapter folds into the weight: rows of ``W`` are scaled for output
scaling (the bias too), columns for input scaling. Unmerging divides again (exact up to rounding).

How the code maps to it (HF PEFT's layout, so files interchange): :class:`IA3Layer` wraps a Linear or
GPT-2 ``Conv1D`` as ``base_layer``; ``ia3_l[name]`` is ``(out, 1)`` for output scaling and ``(1, in)``
for a feed-forward (input-scaling) layer. Several active adapters multiply their vectors (PEFT's rule),
so two (IA)³ adapters compose multiplicatively, not additively. ``target_modules`` chooses the wrapped
layers with PEFT's matching rules; ``feedforward_modules`` says which of them scale their input (PEFT's
rule: a list entry matches when the path *ends with* it, a string is a full-match regex).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tunelab.errors import MethodError
from tunelab.tuners import peft_format, targets
from tunelab.tuners.base import BaseTunerLayer, MethodConfig, tuner_layers

# model_type -> (target_modules, feedforward_modules): HF PEFT's IA3 defaults (keys, values, FFN output).
DEFAULT_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}


class IA3Config(MethodConfig):
    """(IA)³ options (HF PEFT's names and meanings)."""

    method = "ia3"

    target_modules: list[str] | str | None = None
    """Layers to rescale: names (suffix match), a regex (full match) or 'all-linear'; None: PEFT's default."""
    feedforward_modules: list[str] | str | None = None
    """Targets that scale their *input* (FFN down projections); None: the architecture's default."""
    fan_in_fan_out: bool = False
    """PEFT compatibility: the layout is detected per layer (Conv1D stores (in, out))."""
    init_ia3_weights: bool = True
    """True: vectors start at 1 (the adapter is a no-op); False: random (tests)."""
    modules_to_save: list[str] | None = None
    """Modules (e.g. a new 'classifier' head) trained in full as a per-adapter copy and saved with it."""


def is_feedforward(path: str, feedforward_modules: list[str] | str) -> bool:
    """PEFT's rule: a regex must match the whole path; a list entry matches a path that ends with it."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, path) is not None
    return any(path.endswith(name) for name in feedforward_modules)


class IA3Layer(BaseTunerLayer):
    """A Linear/Conv1D whose output (or, for feed-forward layers, input) is rescaled by learned vectors."""

    adapter_attribute_names = ("ia3_l",)
    can_merge = True
    stackable = True  # rescales whatever its base layer (maybe another method's) takes or returns

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__(base_layer)
        linear = targets.base_of(base_layer)  # the Linear / Conv1D, also behind another method's layer
        self.fan_in_fan_out = isinstance(linear, Conv1D)  # weight stored (in, out)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = linear.weight.shape
        else:
            self.in_features, self.out_features = linear.in_features, linear.out_features
        self.feedforward = feedforward  # True: scale the input (in,), else the output (out,)
        self.ia3_l = nn.ParameterDict()  # name -> (1, in) if feedforward else (out, 1)

    def add_adapter(self, name: str, init_ia3_weights: bool = True) -> None:
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        weight = self.base_layer.weight
        vector = torch.ones(shape, device=weight.device) if init_ia3_weights else torch.randn(shape, device=weight.device)
        self.ia3_l[name] = nn.Parameter(vector)  # float32 even over a half-precision base

    def _scaling(self) -> torch.Tensor | None:
        """Product of the active, unmerged vectors, flattened to ``(in,)`` or ``(out,)``; None if none."""
        scaling = None
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            vector = self.ia3_l[name].flatten()
            scaling = vector if scaling is None else scaling * vector
        return scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                raise RuntimeError("adapters are merged: unmerge before disabling them")
            return self.base_layer(x, *args, **kwargs)
        scaling = self._scaling()
        if scaling is None:
            return self.base_layer(x, *args, **kwargs)
        if self.feedforward:
            return self.base_layer((x * scaling).to(x.dtype), *args, **kwargs)  # (..., in) * (in,)
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        return (result * scaling).to(result.dtype)

    def _weight_factor(self, name: str) -> torch.Tensor:
        """The vector shaped to broadcast against the stored weight (Linear (out, in), Conv1D (in, out))."""
        vector = self.ia3_l[name].data
        return vector.T if self.fan_in_fan_out else vector

    @torch.no_grad()
    def _rescale(self, name: str, inverse: bool) -> None:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        factor = self._weight_factor(name)
        weight.data = (weight.data / factor if inverse else weight.data * factor).to(weight.dtype)
        if not self.feedforward and bias is not None:  # output scaling scales the bias as well
            vector = self.ia3_l[name].data.flatten()
            bias.data = (bias.data / vector if inverse else bias.data * vector).to(bias.dtype)

    def merge(self, names: list[str] | tuple[str, ...]) -> None:
        for name in names:
            if name in self.ia3_l and name not in self.merged_adapters:
                self._rescale(name, inverse=False)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._rescale(self.merged_adapters.pop(), inverse=True)

    def extra_repr(self) -> str:
        kind = "input (feed-forward)" if self.feedforward else "output"
        return f"in={self.in_features}, out={self.out_features}, scales={kind}, active={list(self.active_adapters)}"


def resolve_defaults(model: nn.Module, config: IA3Config) -> None:
    """Fill ``target_modules`` / ``feedforward_modules`` from :data:`DEFAULT_MODULES` when unset."""
    if config.target_modules is not None and config.feedforward_modules is not None:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_MODULES:
        if config.target_modules is None:
            kind = f"model type {model_type!r}" if model_type else type(model).__name__
            raise MethodError(f"no default (IA)³ target_modules for {kind}; pass target_modules=[...] and "
                              f"feedforward_modules=[...] (Linear modules: {targets.available_names(model)})")
        config.feedforward_modules = []  # explicit targets, no FFN named: every target scales its output
        return
    default_targets, default_feedforward = DEFAULT_MODULES[model_type]
    if config.target_modules is None:
        config.target_modules = list(default_targets)
    if config.feedforward_modules is None:
        config.feedforward_modules = list(default_feedforward)


def inject(model: nn.Module, config: IA3Config, adapter_name: str) -> list[str]:
    """Add (IA)³ adapter ``adapter_name`` to every target; returns the wrapped paths."""
    targets.check_regex(config.target_modules)
    targets.check_regex(config.feedforward_modules)
    resolve_defaults(model, config)
    paths = targets.find_targets(model, config.target_modules)
    modules = {path: model.get_submodule(path) for path in paths}
    for path, module in modules.items():
        _check_target(path, module)
    feedforward = {path: is_feedforward(path, config.feedforward_modules) for path in paths}
    if isinstance(config.feedforward_modules, list):
        for name in config.feedforward_modules:
            if not any(is_feedforward(path, [name]) for path in paths):
                raise MethodError(f"feedforward_modules entry {name!r} matches none of the (IA)³ targets; "
                                  "feedforward_modules must be a subset of target_modules")
    for path, module in modules.items():
        if isinstance(module, IA3Layer):
            if module.feedforward != feedforward[path]:
                raise MethodError(f"{path!r} already scales its {'input' if module.feedforward else 'output'} "
                                  "for another (IA)³ adapter; use the same feedforward_modules for every adapter")
            layer = module
        else:
            layer = IA3Layer(module, feedforward[path])
            targets.replace_module(model, path, layer)
        layer.add_adapter(adapter_name, config.init_ia3_weights)
    return paths


def _check_target(path: str, module: nn.Module) -> None:
    if isinstance(module, IA3Layer):
        return
    if isinstance(module, BaseTunerLayer):
        targets.check_stack(path, module, IA3Layer)
        module = targets.base_of(module)
    if not isinstance(module, targets.LINEAR_TYPES):
        raise MethodError(f"(IA)³ target {path!r} is a {type(module).__name__}; only Linear and Conv1D layers "
                          "can be rescaled, so narrow target_modules")



# ------------------------------------------------------------------------------------- HF PEFT files


def to_peft(model: nn.Module, config: IA3Config, adapter_name: str) -> dict:
    """PEFT ``IA3Config`` fields for a tunelab (IA)³ adapter (weights: ``<path>.ia3_l``, PEFT's keys)."""
    layers = {path: layer for path, layer in tuner_layers(model)
              if isinstance(layer, IA3Layer) and adapter_name in layer.ia3_l}
    target_modules, feedforward_modules = config.target_modules, config.feedforward_modules
    all_linear = isinstance(target_modules, str) and target_modules.lower() == targets.ALL_LINEAR
    # PEFT requires feedforward_modules ⊆ target_modules literally when both are lists: use exact paths then.
    not_subset = isinstance(target_modules, list) and isinstance(feedforward_modules, list) and \
        not set(feedforward_modules) <= set(target_modules)
    if all_linear or not_subset:
        target_modules = sorted(layers)
        feedforward_modules = sorted(path for path, layer in layers.items() if layer.feedforward)
    return {
        "peft_type": "IA3", "task_type": peft_format.export_task_type(model, config),
        "base_model_name_or_path": peft_format.base_model_name(model), "revision": None, "inference_mode": True,
        "target_modules": target_modules, "exclude_modules": None, "feedforward_modules": feedforward_modules,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "modules_to_save": config.modules_to_save, "init_ia3_weights": True,
    }


def from_peft(record: dict, tensors: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """``("ia3", options)`` for a PEFT IA3 adapter: targets are the modules that have ``ia3_l`` vectors."""
    vectors = {key.removeprefix(peft_format.PEFT_PREFIX).removesuffix(".ia3_l"): value
               for key, value in tensors.items() if key.endswith(".ia3_l")}
    if not vectors:
        raise MethodError("the PEFT adapter holds no ia3_l vectors; check that it is an IA3 adapter")
    rule = record.get("feedforward_modules")
    feedforward = sorted(path for path, vector in vectors.items()
                         if (is_feedforward(path, rule) if rule is not None else vector.shape[0] == 1))
    options = {"target_modules": sorted(vectors), "feedforward_modules": feedforward,
               "fan_in_fan_out": bool(record.get("fan_in_fan_out", False)),
               "modules_to_save": record.get("modules_to_save") or None}
    return "ia3", options
