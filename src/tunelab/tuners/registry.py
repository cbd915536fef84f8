"""The method registry: one explicit ``register(...)`` call per method, at the bottom of this file.

A :class:`MethodSpec` is everything the generic core needs from a method: its config class (options,
validated), its ``inject`` function, and, for methods that do not keep their parameters in wrapper
layers, how to find its tensors (``adapter_state``). Everything else (trainable flags, activation,
disable, merge/unmerge/unload, save/load) the core does by asking the wrapper layers.

Adding a method: write ``tunelab/tuners/<method>.py`` (config + layer + inject), then add one
``register(MethodSpec(...))`` line below. No auto-discovery, no metaclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from tunelab.errors import MethodError
from tunelab.multimodal import coop, maple, vpt
from tunelab.tuners import (
    bottleneck,
    compacter,
    dora,
    full,
    ia3,
    lora,
    multi_lora,
    p_tuning_v2,
    prefix,
    prompt,
    qlora,
)
from tunelab.tuners.base import MethodConfig, layer_adapter_state

InjectFn = Callable[[nn.Module, MethodConfig, str], Any]
AdapterStateFn = Callable[[nn.Module, str], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        name: the method's name in ``tuners.apply(model, name, ...)`` and experiment configs.
        config_class: pydantic model of its options (HF PEFT field names).
        inject: ``inject(model, config, adapter_name)`` wraps targets / adds the adapter, in place.
        summary: one line for ``tunelab methods`` and docs.
        adapter_state: ``(model, adapter_name) -> {key: live tensor}``; save writes these, load copies
            into them. Default: the tensors the wrapper layers hold for that adapter.
        keeps_base_weights: False for methods that train the base weights themselves (full
            fine-tuning): they cannot be disabled or deactivated and cannot share a model with others.
    """

    name: str
    config_class: type[MethodConfig]
    inject: InjectFn
    summary: str = ""
    adapter_state: AdapterStateFn = layer_adapter_state
    keeps_base_weights: bool = True


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (its name must be new)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> MethodSpec:
    """The spec of method ``name``; MethodError listing the registered methods otherwise."""
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(methods())}")
    return _REGISTRY[name]


def build_config(name: str, options: Mapping[str, Any]) -> MethodConfig:
    """Validate ``options`` for method ``name``; one-line MethodError naming the bad option."""
    spec = get(name)
    valid = list(spec.config_class.model_fields)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none (the method takes no options)"
        raise MethodError(f"unknown option {unknown[0]!r} for method {name!r}; valid options: {listed}")
    try:
        return spec.config_class(**options)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "options"
        value = options.get(str(first["loc"][0]), first.get("input")) if first["loc"] else first.get("input")
        raise MethodError(f"invalid option {field}={value!r} for method {name!r}: {first['msg']}; "
                          "fix the value") from None


register(MethodSpec("full", full.FullConfig, full.inject, summary="full fine-tuning: every parameter trains",
                    adapter_state=full.adapter_state, keeps_base_weights=False))
register(MethodSpec("lora", lora.LoraConfig, lora.inject,
                    summary="LoRA / rsLoRA: a trainable low-rank update B A on frozen Linear weights"))
register(MethodSpec("dora", dora.DoraConfig, dora.inject,
                    summary="DoRA: a trainable magnitude times the normalised direction W + s B A"))
register(MethodSpec("qlora", qlora.QLoraConfig, qlora.inject,
                    summary="QLoRA: LoRA over NF4 4-bit base weights with double-quantized block constants"))
register(MethodSpec("lora_mixture", multi_lora.LoraMixtureConfig, multi_lora.inject_mixture,
                    summary="a learned per-layer gate over k frozen LoRA experts (multi_lora.mixture)"))
register(MethodSpec("coop", coop.CoOpConfig, coop.inject,
                    summary="CoOp: learnable text context vectors replace CLIP's hand-written prompt words"))
register(MethodSpec("vpt", vpt.VPTConfig, vpt.inject,
                    summary="VPT: learnable tokens in CLIP's vision transformer, at the input (shallow) or every layer (deep)"))
register(MethodSpec("maple", maple.MaPLeConfig, maple.inject,
                    summary="MaPLe: deep text prompts plus vision prompts coupled to them by learned linear maps"))
register(MethodSpec("ia3", ia3.IA3Config, ia3.inject,
                    summary="(IA)³: learned vectors rescale keys, values and feed-forward activations (mergeable)"))
register(MethodSpec("bottleneck", bottleneck.BottleneckConfig, bottleneck.inject,
                    summary="bottleneck adapters: a residual down/up MLP after attention and/or FFN (Houlsby, Pfeiffer)"))
register(MethodSpec("compacter", compacter.CompacterConfig, compacter.inject, adapter_state=compacter.adapter_state,
                    summary="Compacter / Compacter++: adapters with low-rank Kronecker (PHM) projections"))
register(MethodSpec("prompt_tuning", prompt.PromptTuningConfig, prompt.inject,
                    summary="prompt tuning: n trainable virtual token embeddings prepended to the input"))
register(MethodSpec("prefix_tuning", prefix.PrefixTuningConfig, prefix.inject,
                    summary="prefix tuning: trainable key/value prefixes at every layer, optionally via an MLP"))
register(MethodSpec("p_tuning_v2", p_tuning_v2.PTuningV2Config, p_tuning_v2.inject,
                    summary="P-Tuning v2: deep key/value prompts plus a trained linear head (NLU tasks)"))
