"""HF PEFT file interop: write adapters ``peft.PeftModel.from_pretrained`` loads, read PEFT's adapters.

PEFT's directory holds ``adapter_config.json`` (``peft_type``, ``r``, ``lora_alpha``,
``target_modules``, ...) and ``adapter_model.safetensors``, whose keys are the module path under PEFT's
wrapper with the adapter name removed::

    base_model.model.<module path>.lora_A.weight        (r, in)
    base_model.model.<module path>.lora_B.weight        (out, r)
    base_model.model.<module path>.<param>              modules_to_save copies (e.g. classifier.weight)

tunelab's own keys are the same without the prefix (and with ``modules_to_save.`` before a copy's
parameters), so :func:`to_peft_key` maps one to the other. Loading injects a fresh adapter from the
translated config and copies the file's tensors into it (``core.load``); the targets are read from the
weight keys, so PEFT options that only select modules (``layers_to_transform``, ``exclude_modules``)
need no translation. Layout with several adapters follows PEFT: "default" at the top, others in
``<path>/<name>/`` (a single adapter always goes at the top).

Per method: an exporter (config -> PEFT json) in :data:`EXPORTERS` and an importer (json -> config)
in :data:`IMPORTERS`, keyed by tunelab method / PEFT ``peft_type``. A LoRA variant that PEFT stores as
``peft_type: LORA`` with a flag (DoRA: ``use_dora``) adds its exporter and makes ``lora_from_peft``
return its config when the flag is set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners import targets
from tunelab.tuners.base import MethodConfig, tuner_layers
from tunelab.tuners.lora import LoraConfig, LoraLayer
from tunelab.utils import atomic_path, atomic_write_json

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_COPY_MARKER = ".modules_to_save."

# PEFT options tunelab's LoRA does not implement -> their "off" value. A file using one is refused
# rather than loaded to different outputs.
_LORA_UNSUPPORTED = {"bias": "none", "lora_bias": False, "layer_replication": None,
                     "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
                     "alora_invocation_tokens": None}


def to_peft_key(own_key: str) -> str:
    """``model.q_proj.lora_A.weight`` -> ``base_model.model.model.q_proj.lora_A.weight``."""
    return PEFT_PREFIX + own_key.replace(_COPY_MARKER, ".", 1)


def is_peft_dir(path: Path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file()


def base_model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class (None: plain ``PeftModel``)."""
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM"
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


def save(model: nn.Module, path: Path, configs: dict[str, MethodConfig]) -> None:
    """Write each adapter in ``configs`` as PEFT files under ``path``."""
    from tunelab.tuners import registry  # registry imports the methods; import late to keep layers simple

    for name, config in configs.items():
        exporter = EXPORTERS.get(config.method)
        if exporter is None:
            raise MethodError(f"method {config.method!r} has no HF PEFT format (PEFT export: "
                              f"{', '.join(EXPORTERS)}); save with format='tunelab'")
        directory = path if len(configs) == 1 or name == "default" else path / name
        directory.mkdir(parents=True, exist_ok=True)
        state = STATE_EXPORTS.get(config.method, registry.get(config.method).adapter_state)(model, name)
        to_key = key_map(config.method)
        tensors = {to_key(key): tensor.detach().cpu().contiguous() for key, tensor in state.items()}
        with atomic_path(directory / PEFT_WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        atomic_write_json(directory / PEFT_CONFIG, exporter(model, config, name))


def read(path: Path) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
    """The tunelab config and the (PEFT-keyed) tensors of the PEFT adapter in ``path``."""
    record = json.loads((Path(path) / PEFT_CONFIG).read_text(encoding="utf-8"))
    peft_type = record.get("peft_type")
    importer = IMPORTERS.get(peft_type)
    if importer is None:
        raise MethodError(f"PEFT adapter type {peft_type!r} in {path} is not supported; "
                          f"tunelab imports: {', '.join(IMPORTERS)}")
    weights = Path(path) / PEFT_WEIGHTS
    if weights.is_file():
        tensors = load_file(str(weights))
    elif (Path(path) / "adapter_model.bin").is_file():
        tensors = torch.load(Path(path) / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise MethodError(f"{path} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}; copy the adapter's weights file too")
    return importer(record, tensors), tensors


# ----------------------------------------------------------------------------------------------- LoRA


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def lora_to_peft(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict:
    """PEFT ``LoraConfig`` fields for a tunelab LoRA adapter."""
    layers = {path: layer for path, layer in tuner_layers(model)
              if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A}
    target_modules = config.target_modules
    if isinstance(target_modules, str) and target_modules.lower() == targets.ALL_LINEAR:
        target_modules = sorted(layers)  # exact paths: PEFT's all-linear keeps heads for some task types
    return {
        "peft_type": "LORA", "task_type": task_type(model), "base_model_name_or_path": base_model_name(model),
        "revision": None, "inference_mode": True, "r": config.r, "lora_alpha": _number(config.lora_alpha),
        "lora_dropout": config.lora_dropout, "target_modules": target_modules, "exclude_modules": None,
        "use_rslora": config.use_rslora, "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none", "init_lora_weights": True, "modules_to_save": config.modules_to_save,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": {key: _number(value) for key, value in config.alpha_pattern.items()},
        "layers_to_transform": None, "layers_pattern": None, "use_dora": config.use_dora, "lora_bias": False,
    }


def lora_from_peft(record: dict, tensors: dict[str, torch.Tensor]) -> LoraConfig:
    """A tunelab ``LoraConfig`` for a PEFT LoRA adapter; targets are the modules that have weights."""
    for option, off in _LORA_UNSUPPORTED.items():
        if record.get(option, off) not in (off, None, False, [], {}):
            raise MethodError(f"the PEFT adapter sets {option}={record[option]!r}, which tunelab's LoRA does not "
                              f"support; retrain it with {option}={off!r}")
    paths = set()
    for key in tensors:
        if ".lora_" not in key:
            continue  # a modules_to_save copy
        if not key.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")):
            raise MethodError(f"the PEFT adapter holds {key!r}, which tunelab's LoRA import does not support "
                              "(only Linear/Conv1D lora_A/lora_B weights)")
        paths.add(key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0])
    if not paths:
        raise MethodError("the PEFT adapter holds no lora_A/lora_B weights; check that it is a LoRA adapter")
    from tunelab.tuners import registry

    options = {"r": record.get("r", 8), "lora_alpha": record.get("lora_alpha", 8),
               "lora_dropout": record.get("lora_dropout", 0.0), "target_modules": sorted(paths),
               "use_rslora": bool(record.get("use_rslora", False)),
               "fan_in_fan_out": bool(record.get("fan_in_fan_out", False)),
               "modules_to_save": record.get("modules_to_save") or None,
               "rank_pattern": record.get("rank_pattern") or {}, "alpha_pattern": record.get("alpha_pattern") or {}}
    return registry.build_config("dora" if record.get("use_dora") else "lora", options)


EXPORTERS: dict[str, Callable[[nn.Module, MethodConfig, str], dict]] = {"lora": lora_to_peft, "dora": lora_to_peft}
IMPORTERS: dict[str, Callable[[dict, dict[str, torch.Tensor]], MethodConfig]] = {"LORA": lora_from_peft}
EXPORTERS["qlora"] = lora_to_peft  # PEFT stores QLoRA adapters as plain LORA; the 4-bit base is the model's
# Methods whose PEFT keys are not module paths (own key -> PEFT key), and methods whose PEFT file holds
# other tensors than their live state (e.g. folded prefixes): method -> (model, adapter name) -> state.
KEY_MAPS: dict[str, Callable[[str], str]] = {}
STATE_EXPORTS: dict[str, Callable[[nn.Module, str], dict[str, torch.Tensor]]] = {}


def key_map(method: str) -> Callable[[str], str]:
    """Own key -> PEFT key for ``method`` (module-path methods: :func:`to_peft_key`)."""
    return KEY_MAPS.get(method, to_peft_key)


# Prompt methods keep their converters in their own module (it uses the helpers above).
from tunelab.tuners import prompt_peft  # noqa: E402

EXPORTERS.update(prompt_peft.EXPORTERS)
IMPORTERS.update(prompt_peft.IMPORTERS)
KEY_MAPS.update(prompt_peft.KEY_MAPS)
STATE_EXPORTS.update(prompt_peft.STATE_EXPORTS)

# (IA)³ keeps its converters in ia3.py (keys are module paths + ".ia3_l", as PEFT's).
from tunelab.tuners import ia3  # noqa: E402

EXPORTERS["ia3"] = ia3.to_peft
IMPORTERS["IA3"] = ia3.from_peft
