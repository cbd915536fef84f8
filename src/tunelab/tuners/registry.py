"""The method registry: one explicit ``register(...)`` call per method, at the bottom of this file.

A :class:`MethodSpec` is everything the generic core needs from a method: its config class (options,
validated), its ``inject`` function, for methods that do not keep their parameters in wrapper layers
how to find its tensors (``adapter_state``), and, where HF PEFT has the method, its PEFT converters
(``peft_type``, ``to_peft``, ``from_peft``, ``peft_key``, ``peft_state``), so ``peft_format`` stays a
leaf that asks the entry. Everything else (trainable flags, activation, disable, merge/unmerge/unload,
save/load) the core does by asking the wrapper layers.

Import direction: this module imports every method module; no method module imports it (or
``core``), so there are no circles. CoOp / VPT / MaPLe (CLIP prompt learning) live in
``tuners/prompts/`` like the other prompt methods; ``tunelab.multimodal`` keeps the CLIP model, the
image world and the base-to-novel protocol, and imports ``tuners``, never the reverse.

Adding a method: write ``tunelab/tuners/<family>/<method>.py`` (config + layer + inject), then add one
``register(MethodSpec(...))`` line below. No auto-discovery, no metaclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners import full, peft_format
from tunelab.tuners.adapters import bottleneck, compacter, ia3
from tunelab.tuners.base import MethodConfig, layer_adapter_state
from tunelab.tuners.lora import dora, lora, mixture, qlora
from tunelab.tuners.lora import peft as lora_peft
from tunelab.tuners.notes import METHOD_NOTES
from tunelab.tuners.prompts import coop, maple, p_tuning_v2, prefix, prompt, prompt_peft, vpt

InjectFn = Callable[[nn.Module, MethodConfig, str], Any]
AdapterStateFn = Callable[[nn.Module, str], dict[str, torch.Tensor]]
ToPeftFn = Callable[[nn.Module, MethodConfig, str], dict]
FromPeftFn = Callable[[dict, dict[str, torch.Tensor]], tuple[str, dict]]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        name: the method's name in ``tuners.apply(model, name, ...)`` and experiment configs.
        config_class: pydantic model of its options (HF PEFT field names).
        inject: ``inject(model, config, adapter_name)`` wraps targets / adds the adapter, in place.
        summary: one line for ``tunelab methods`` and docs.
        notes: the method's math in two lines for reports (default: from ``tuners/notes.py``).
        adapter_state: ``(model, adapter_name) -> {key: live tensor}``; save writes these, load copies
            into them. Default: the tensors the wrapper layers hold for that adapter.
        keeps_base_weights: False for methods that train the base weights themselves (full
            fine-tuning): they cannot be disabled or deactivated and cannot share a model with others.
        peft_type: HF PEFT's ``peft_type`` of the method's files (None: no PEFT format).
        to_peft: ``(model, config, adapter_name) -> adapter_config.json fields``.
        from_peft: ``(adapter_config.json record, tensors) -> (method name, options)``; one entry per
            ``peft_type`` has it (e.g. LoRA's returns "dora" for ``use_dora`` files).
        peft_key: own tensor key -> PEFT key (default: the module path under ``base_model.model.``).
        peft_state: the tensors PEFT stores when they are not the live ones (folded prefixes);
            default ``adapter_state``.
    """

    name: str
    config_class: type[MethodConfig]
    inject: InjectFn
    summary: str = ""
    notes: str = ""
    adapter_state: AdapterStateFn = layer_adapter_state
    keeps_base_weights: bool = True
    peft_type: str | None = None
    to_peft: ToPeftFn | None = None
    from_peft: FromPeftFn | None = None
    peft_key: Callable[[str], str] = peft_format.to_peft_key
    peft_state: AdapterStateFn | None = None


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (its name must be new)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    if not spec.notes and spec.name in METHOD_NOTES:
        spec = dataclasses.replace(spec, notes=METHOD_NOTES[spec.name])
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


def for_peft_type(peft_type: str | None) -> MethodSpec:
    """The entry that imports PEFT files of ``peft_type``; MethodError listing the supported types otherwise."""
    for spec in _REGISTRY.values():
        if spec.peft_type == peft_type and spec.from_peft is not None:
            return spec
    supported = sorted({spec.peft_type for spec in _REGISTRY.values() if spec.from_peft is not None})
    raise MethodError(f"PEFT adapter type {peft_type!r} is not supported; tunelab imports: {', '.join(supported)}")


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


LORA_PEFT = dict(peft_type="LORA", to_peft=lora_peft.to_peft)  # PEFT stores DoRA and QLoRA as LORA too
PREFIX_PEFT = dict(peft_type="PREFIX_TUNING", to_peft=prompt_peft.prefix_to_peft, peft_key=prompt_peft.peft_key,
                   peft_state=prompt_peft.prefix_state)

register(MethodSpec("full", full.FullConfig, full.inject, summary="full fine-tuning: every parameter trains",
                    adapter_state=full.adapter_state, keeps_base_weights=False))
# dora.inject serves lora too: PEFT's use_dora flag on a LoRA config selects the DoRA variant.
register(MethodSpec("lora", lora.LoraConfig, dora.inject, **LORA_PEFT, from_peft=lora_peft.from_peft,
                    summary="LoRA / rsLoRA: a trainable low-rank update B A on frozen Linear weights"))
register(MethodSpec("dora", dora.DoraConfig, dora.inject, **LORA_PEFT,
                    summary="DoRA: a trainable magnitude times the normalised direction W + s B A"))
register(MethodSpec("qlora", qlora.QLoraConfig, qlora.inject, **LORA_PEFT,
                    summary="QLoRA: LoRA over NF4 4-bit base weights with double-quantized block constants"))
register(MethodSpec("lora_mixture", mixture.LoraMixtureConfig, mixture.inject,
                    summary="a learned per-layer gate over k frozen LoRA experts (multi_lora.mixture)"))
register(MethodSpec("coop", coop.CoOpConfig, coop.inject,
                    summary="CoOp: learnable text context vectors replace CLIP's hand-written prompt words"))
register(MethodSpec("vpt", vpt.VPTConfig, vpt.inject,
                    summary="VPT: learnable tokens in CLIP's vision transformer, at the input (shallow) or every layer (deep)"))
register(MethodSpec("maple", maple.MaPLeConfig, maple.inject,
                    summary="MaPLe: deep text prompts plus vision prompts coupled to them by learned linear maps"))
register(MethodSpec("ia3", ia3.IA3Config, ia3.inject, peft_type="IA3", to_peft=ia3.to_peft, from_peft=ia3.from_peft,
                    summary="(IA)³: learned vectors rescale keys, values and feed-forward activations (mergeable)"))
register(MethodSpec("bottleneck", bottleneck.BottleneckConfig, bottleneck.inject,
                    summary="bottleneck adapters: a residual down/up MLP after attention and/or FFN (Houlsby, Pfeiffer)"))
register(MethodSpec("compacter", compacter.CompacterConfig, compacter.inject, adapter_state=compacter.adapter_state,
                    summary="Compacter / Compacter++: adapters with low-rank Kronecker (PHM) projections"))
register(MethodSpec("prompt_tuning", prompt.PromptTuningConfig, prompt.inject, peft_type="PROMPT_TUNING",
                    to_peft=prompt_peft.prompt_tuning_to_peft, from_peft=prompt_peft.prompt_tuning_from_peft,
                    peft_key=prompt_peft.peft_key,
                    summary="prompt tuning: n trainable virtual token embeddings prepended to the input"))
register(MethodSpec("prefix_tuning", prefix.PrefixTuningConfig, prefix.inject, **PREFIX_PEFT,
                    from_peft=prompt_peft.prefix_from_peft,  # returns p_tuning_v2 for classification files
                    summary="prefix tuning: trainable key/value prefixes at every layer, optionally via an MLP"))
register(MethodSpec("p_tuning_v2", p_tuning_v2.PTuningV2Config, p_tuning_v2.inject, **PREFIX_PEFT,
                    summary="P-Tuning v2: deep key/value prompts plus a trained linear head (NLU tasks)"))
