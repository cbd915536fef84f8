"""HF PEFT files for the LoRA family: ``peft_type: LORA`` (plain LoRA, rsLoRA, DoRA via ``use_dora``, QLoRA).

PEFT stores DoRA as LoRA with ``use_dora: true`` (plus ``<path>.lora_magnitude_vector`` tensors) and
QLoRA adapters as plain LoRA (the 4-bit base is the model's business), so one exporter serves all
three; the importer returns ``dora`` when the flag is set. Registered on the methods' registry entries.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners import peft_format, targets
from tunelab.tuners.base import tuner_layers
from tunelab.tuners.lora.lora import LoraConfig, LoraLayer

# PEFT options tunelab's LoRA does not implement -> their "off" value. A file using one is refused
# rather than loaded to different outputs.
_LORA_UNSUPPORTED = {"bias": "none", "lora_bias": False, "layer_replication": None,
                     "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
                     "alora_invocation_tokens": None}
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


def to_peft(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict:
    """PEFT ``LoraConfig`` fields for a tunelab LoRA / DoRA / QLoRA adapter."""
    layers = {path: layer for path, layer in tuner_layers(model)
              if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A}
    target_modules = config.target_modules
    if isinstance(target_modules, str) and target_modules.lower() == targets.ALL_LINEAR:
        target_modules = sorted(layers)  # exact paths: PEFT's all-linear keeps heads for some task types
    number = peft_format.number
    return {
        "peft_type": "LORA", "task_type": peft_format.export_task_type(model, config),
        "base_model_name_or_path": peft_format.base_model_name(model),
        "revision": None, "inference_mode": True, "r": config.r, "lora_alpha": number(config.lora_alpha),
        "lora_dropout": config.lora_dropout, "target_modules": target_modules, "exclude_modules": None,
        "use_rslora": config.use_rslora, "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none", "init_lora_weights": True, "modules_to_save": config.modules_to_save,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": {key: number(value) for key, value in config.alpha_pattern.items()},
        "layers_to_transform": None, "layers_pattern": None, "use_dora": config.use_dora, "lora_bias": False,
    }


def from_peft(record: dict, tensors: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """``("lora" | "dora", options)`` for a PEFT LoRA adapter; targets are the modules that have weights."""
    for option, off in _LORA_UNSUPPORTED.items():
        if record.get(option, off) not in (off, None, False, [], {}):
            raise MethodError(f"the PEFT adapter sets {option}={record[option]!r}, which tunelab's LoRA does not "
                              f"support; retrain it with {option}={off!r}")
    paths = set()
    for key in tensors:
        if ".lora_" not in key:
            continue  # a modules_to_save copy
        if not key.endswith(_LORA_SUFFIXES):
            raise MethodError(f"the PEFT adapter holds {key!r}, which tunelab's LoRA import does not support "
                              "(only Linear/Conv1D lora_A/lora_B weights)")
        paths.add(key.removeprefix(peft_format.PEFT_PREFIX).rsplit(".lora_", 1)[0])
    if not paths:
        raise MethodError("the PEFT adapter holds no lora_A/lora_B weights; check that it is a LoRA adapter")
    options = {"r": record.get("r", 8), "lora_alpha": record.get("lora_alpha", 8),
               "lora_dropout": record.get("lora_dropout", 0.0), "target_modules": sorted(paths),
               "use_rslora": bool(record.get("use_rslora", False)),
               "fan_in_fan_out": bool(record.get("fan_in_fan_out", False)),
               "modules_to_save": record.get("modules_to_save") or None,
               "rank_pattern": record.get("rank_pattern") or {}, "alpha_pattern": record.get("alpha_pattern") or {}}
    return ("dora" if record.get("use_dora") else "lora"), options
