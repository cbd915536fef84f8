"""HF PEFT files for the prompt methods: prompt tuning (``PROMPT_TUNING``) and prefix tuning / P-Tuning v2
(``PREFIX_TUNING``).

PEFT keeps a prompt-learning adapter outside the base model, so its file is not keyed by module
paths. ``adapter_model.safetensors`` holds::

    prompt_embeddings                  (n, d)          prompt tuning: the virtual token embeddings
    prompt_embeddings                  (n, 2 L H d)    prefix tuning: the folded prefixes P (MLP applied)
    base_model.<module path>.<param>                   modules_to_save copies (e.g. base_model.classifier.weight)

and ``adapter_config.json`` the geometry PEFT re-derives from the model (``token_dim``,
``num_layers``, ``num_attention_heads`` = key/value heads for prefixes). A reparameterized prefix is
exported folded (PEFT does the same: its loader rebuilds the encoder in inference mode, without the
MLP), so it imports back as ``prefix_projection=False`` -- the same outputs, no MLP.

PEFT's task type selects the forward that injects the prompts (PEFT's plain ``PeftModel`` does not),
so export needs a transformers model class with a task (``*ForCausalLM``, ``*ForSequenceClassification``,
``*ForTokenClassification``). ``PREFIX_TUNING`` files of classification task types import as
``p_tuning_v2`` (in PEFT that is what P-Tuning v2 is), others as ``prefix_tuning``.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners import peft_format
from tunelab.tuners.base import MethodConfig, layer_adapter_state
from tunelab.tuners.prompts.prefix import PrefixLayer, folded_prefixes, kv_geometry
from tunelab.tuners.prompts.prompt_learning import PREFIX_ATTRIBUTE, PROMPT_ATTRIBUTE

PEFT_PROMPT_KEY = "prompt_embeddings"
PROMPT_KEY = f"{PROMPT_ATTRIBUTE}.prompt_embeddings"  # tunelab's own key of the prompt tensor
PREFIX_KEY = f"{PREFIX_ATTRIBUTE}.prefix_embeddings"
_OWN_KEYS = (PROMPT_KEY, PREFIX_KEY)
CLASSIFICATION_TASKS = ("SEQ_CLS", "TOKEN_CLS")


def peft_key(own_key: str) -> str:
    """``tunelab_prefix.prefix_embeddings`` -> ``prompt_embeddings``; ``classifier.modules_to_save.weight``
    -> ``base_model.classifier.weight`` (prompt learning: PEFT's base_model is the model itself)."""
    if own_key in _OWN_KEYS:
        return PEFT_PROMPT_KEY
    return "base_model." + own_key.replace(peft_format.COPY_MARKER, ".", 1)


def prefix_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors as PEFT stores them: folded prefixes instead of embedding + MLP."""
    state = {key: tensor for key, tensor in layer_adapter_state(model, adapter_name).items()
             if not key.startswith(f"{PREFIX_ATTRIBUTE}.")}
    state[PREFIX_KEY] = folded_prefixes(model, adapter_name)
    return state


def _task_type(model: nn.Module, method: str) -> str:
    task = peft_format.task_type(model)
    if task is None or task == "SEQ_2_SEQ_LM":
        raise MethodError(f"{method} has a PEFT format only for decoder or encoder models with a task head "
                          f"(*ForCausalLM, *ForSequenceClassification, ...), not {type(model).__name__}; "
                          "save with format='tunelab'")
    return task


def _common(model: nn.Module, config: MethodConfig, peft_type: str) -> dict:
    layers, _, _ = kv_geometry(model)
    config_heads = getattr(model.config, "num_attention_heads", None) or getattr(model.config, "n_head", None)
    return {"peft_type": peft_type, "task_type": _task_type(model, config.method),
            "base_model_name_or_path": peft_format.base_model_name(model), "revision": None,
            "inference_mode": True, "num_virtual_tokens": config.num_virtual_tokens,
            "num_transformer_submodules": 1, "num_layers": layers, "num_attention_heads": config_heads,
            "modules_to_save": config.modules_to_save}


def prompt_tuning_to_peft(model: nn.Module, config: MethodConfig, adapter_name: str) -> dict:
    """PEFT ``PromptTuningConfig`` fields for a tunelab prompt-tuning adapter."""
    record = _common(model, config, "PROMPT_TUNING")
    init, tokenizer = config.prompt_tuning_init, config.tokenizer_name_or_path
    if init == "TEXT" and not tokenizer:
        init = "RANDOM"  # PEFT requires a tokenizer path for TEXT; the file's weights replace any init anyway
    record.update({"token_dim": model.get_input_embeddings().embedding_dim, "prompt_tuning_init": init,
                   "prompt_tuning_init_text": config.prompt_tuning_init_text if init == "TEXT" else None,
                   "tokenizer_name_or_path": tokenizer if init == "TEXT" else None, "tokenizer_kwargs": None})
    return record


def prefix_to_peft(model: nn.Module, config: MethodConfig, adapter_name: str) -> dict:
    """PEFT ``PrefixTuningConfig`` fields for a tunelab prefix-tuning or P-Tuning v2 adapter."""
    record = _common(model, config, "PREFIX_TUNING")
    layer = getattr(model, PREFIX_ATTRIBUTE)
    assert isinstance(layer, PrefixLayer)
    _, kv_heads, _ = layer.geometry
    record.update({"token_dim": layer.token_dim, "num_attention_heads": kv_heads,
                   "encoder_hidden_size": config.encoder_hidden_size, "prefix_projection": config.prefix_projection,
                   "init_weights": None})
    return record


def _modules_to_save(record: dict, tensors: dict[str, torch.Tensor]) -> list[str] | None:
    """The record's modules_to_save that the file really holds copies of (PEFT lists 'classifier' and 'score')."""
    paths = [key.removeprefix("base_model.") for key in tensors if key.startswith("base_model.")]
    names = [name for name in dict.fromkeys(record.get("modules_to_save") or [])
             if any(f".{name}." in f".{path}" for path in paths)]
    return names or None


def _check_prompt_record(record: dict, tensors: dict[str, torch.Tensor]) -> int:
    if record.get("num_transformer_submodules", 1) not in (1, None):
        raise MethodError("the PEFT prompt adapter is for an encoder-decoder model (num_transformer_submodules=2), "
                          "which tunelab's prompt methods do not support")
    if PEFT_PROMPT_KEY not in tensors:
        raise MethodError(f"the PEFT adapter has no '{PEFT_PROMPT_KEY}' tensor; save it again with PEFT's "
                          "save_pretrained")
    return int(tensors[PEFT_PROMPT_KEY].shape[0])


def prompt_tuning_from_peft(record: dict, tensors: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """``("prompt_tuning", options)`` for a PEFT ``PROMPT_TUNING`` adapter (the file's embeddings are the init)."""
    n = _check_prompt_record(record, tensors)
    return "prompt_tuning", {"num_virtual_tokens": n, "modules_to_save": _modules_to_save(record, tensors)}


def prefix_from_peft(record: dict, tensors: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """``("prefix_tuning" | "p_tuning_v2", options)`` for a PEFT ``PREFIX_TUNING`` adapter; prefixes come folded."""
    n = _check_prompt_record(record, tensors)
    method = "p_tuning_v2" if record.get("task_type") in CLASSIFICATION_TASKS else "prefix_tuning"
    return method, {"num_virtual_tokens": n, "prefix_projection": False,
                    "encoder_hidden_size": record.get("encoder_hidden_size"),
                    "modules_to_save": _modules_to_save(record, tensors)}

