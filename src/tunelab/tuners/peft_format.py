"""HF PEFT file interop: write adapters ``peft.PeftModel.from_pretrained`` loads, read PEFT's adapters.

PEFT's directory holds ``adapter_config.json`` (``peft_type``, ``r``, ``lora_alpha``,
``target_modules``, ...) and ``adapter_model.safetensors``, whose keys are the module path under PEFT's
wrapper with the adapter name removed::

    base_model.model.<module path>.lora_A.weight        (r, in)
    base_model.model.<module path>.lora_B.weight        (out, r)
    base_model.model.<module path>.<param>              modules_to_save copies (e.g. classifier.weight)

tunelab's own keys are the same without the prefix (and with ``modules_to_save.`` before a copy's
parameters), so :func:`to_peft_key` maps one to the other. Layout with several adapters follows PEFT:
"default" at the top, others in ``<path>/<name>/`` (a single adapter always goes at the top).

This module is a leaf: it knows the file layout and the helpers every converter shares, and nothing
about methods. Each method's converters ride on its registry entry (:class:`~tunelab.tuners.registry.MethodSpec`
fields ``peft_type``, ``to_peft``, ``from_peft``, ``peft_key``, ``peft_state``); :func:`save` asks the
entries it is given, and ``core.load`` picks the entry for a file's ``peft_type``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners.base import MethodConfig
from tunelab.utils import atomic_path, atomic_write_json

if TYPE_CHECKING:
    from tunelab.tuners.registry import MethodSpec

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
COPY_MARKER = ".modules_to_save."
# PEFT task type -> the head names PEFT puts in modules_to_save for it (SEQ_CLS_HEAD_NAMES, QA's).
TASK_HEADS: dict[str, tuple[str, ...]] = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                                          "QUESTION_ANS": ("qa_outputs",)}


def to_peft_key(own_key: str) -> str:
    """``model.q_proj.lora_A.weight`` -> ``base_model.model.model.q_proj.lora_A.weight``."""
    return PEFT_PREFIX + own_key.replace(COPY_MARKER, ".", 1)


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


def task_heads(model: nn.Module) -> list[str]:
    """The task head(s) PEFT trains and saves in ``modules_to_save`` for this model class (e.g. ``classifier``)."""
    names = TASK_HEADS.get(task_type(model) or "", ())
    return [name for name in names if isinstance(getattr(model, name, None), nn.Module)]


def export_task_type(model: nn.Module, config: MethodConfig) -> str | None:
    """``task_type`` for a module-path adapter's file: the model's, unless the file lacks the task head.

    PEFT's task models always wrap the head in ``modules_to_save`` and then require its weights in
    the file; an adapter whose head was deliberately left out loads as a plain ``PeftModel``, which
    runs the base model's own head -- the same outputs.
    """
    saved = getattr(config, "modules_to_save", None) or []
    if any(head not in saved for head in task_heads(model)):
        return None
    return task_type(model)


def number(value: float) -> float | int:
    """``8.0`` -> ``8`` (PEFT's json writes integers where the value is one)."""
    return int(value) if float(value).is_integer() else value


def save(model: nn.Module, path: Path, configs: Mapping[str, MethodConfig],
         specs: Mapping[str, MethodSpec]) -> None:
    """Write each adapter in ``configs`` as PEFT files under ``path``; ``specs`` are their registry entries.

    Everything is checked before a file is written: every method needs a PEFT format, and all adapters one
    ``peft_type`` (a ``PeftModel`` refuses adapters of different types, so a combination of methods, e.g.
    LoRA + prefix tuning, has no PEFT form: save it with ``format='tunelab'``).
    """
    for name, config in configs.items():
        if specs[name].to_peft is None:
            raise MethodError(f"method {config.method!r} has no HF PEFT format; save with format='tunelab'")
    kinds = {specs[name].peft_type: name for name in configs}
    if len(kinds) > 1:
        first, second = list(kinds.values())[:2]
        raise MethodError(f"adapters {first!r} ({configs[first].method}) and {second!r} ({configs[second].method}) "
                          "are different HF PEFT types, which one PEFT model cannot hold; save the combination "
                          "with format='tunelab' (or each adapter alone with adapter_names=[...])")
    for name, config in configs.items():
        spec = specs[name]
        directory = path if len(configs) == 1 or name == "default" else path / name
        directory.mkdir(parents=True, exist_ok=True)
        state = (spec.peft_state or spec.adapter_state)(model, name)
        tensors = {spec.peft_key(key): tensor.detach().cpu().contiguous() for key, tensor in state.items()}
        with atomic_path(directory / PEFT_WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        atomic_write_json(directory / PEFT_CONFIG, spec.to_peft(model, config, name))


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``adapter_config.json`` record and the (PEFT-keyed) tensors of the PEFT adapter in ``path``.

    A malformed config, corrupt safetensors or a pickle that is not plain tensors is a one-line
    :class:`MethodError` (pickles load with ``weights_only=True``: no code runs).
    """
    import pickle

    from safetensors import SafetensorError

    try:
        record = json.loads((Path(path) / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MethodError(f"{path}/{PEFT_CONFIG} is not valid JSON ({type(error).__name__}); "
                          "save the adapter again") from None
    if not isinstance(record, dict):
        raise MethodError(f"{path}/{PEFT_CONFIG} must hold a JSON object, not {type(record).__name__}")
    weights = Path(path) / PEFT_WEIGHTS
    try:
        if weights.is_file():
            tensors = load_file(str(weights))
        elif (Path(path) / "adapter_model.bin").is_file():
            tensors = torch.load(Path(path) / "adapter_model.bin", map_location="cpu", weights_only=True)
        else:
            raise MethodError(f"{path} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}; copy the adapter's weights file too")
    except (SafetensorError, OSError, ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise MethodError(f"adapter weights in {path} are corrupt or not plain tensors ({type(error).__name__}); "
                          "save the adapter again as safetensors") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise MethodError(f"adapter weights in {path} are not a mapping of tensors; save the adapter again")
    return record, tensors
