"""Which modules a method wraps: ``target_modules`` matching with HF PEFT's rules.

``target_modules`` takes one of (PEFT semantics, so a user's PEFT configs transfer):

- a list of names: a module matches when its path equals a name or ends with ``"." + name``
  (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- a string: a regular expression that must match the whole path (``re.fullmatch``);
- ``"all-linear"``: every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output layer
  (``get_output_embeddings()``, e.g. ``lm_head``) and a classification head named ``classifier`` or
  ``score`` (PEFT excludes these for ``SEQ_CLS``; a freshly initialised head should not get a low-rank
  delta, it should train in full through ``modules_to_save``);
- ``None``: a per-architecture default from :data:`DEFAULT_TARGET_MODULES` (PEFT's table, abridged).

Modules inside an existing wrapper layer are never candidates; the wrapper itself stands at the
original path, so adding a second adapter to ``q_proj`` finds the wrapper, not its ``base_layer``.
Another method's wrapper found there is wrapped in turn when both layers are stackable
(:func:`check_stack`; ``base.py``, *Stacks*).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from tunelab.errors import MethodError
from tunelab.tuners.base import BaseTunerLayer

TargetModules = list[str] | str | None

ALL_LINEAR = "all-linear"
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
CLASSIFIER_HEAD_NAMES = ("classifier", "score")  # PEFT's SEQ_CLS_HEAD_NAMES
MAX_LISTED_NAMES = 20  # keep "available modules" error messages to one readable line

# model_type -> LoRA-style default targets (attention query and value, as in the LoRA paper).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "t5": ["q", "v"],
}


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for every module a method may target: wrappers count, their insides do not."""
    yield from _candidates(model, "")


def _candidates(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not isinstance(child, BaseTunerLayer):
            yield from _candidates(child, path)


def base_of(module: nn.Module) -> nn.Module:
    """The innermost original module behind (possibly nested) wrappers."""
    while isinstance(module, BaseTunerLayer) and module.base_layer is not None:
        module = module.base_layer
    return module


def check_stack(path: str, module: nn.Module, layer_class: type[BaseTunerLayer]) -> None:
    """MethodError unless a ``layer_class`` wrapper may wrap ``module`` (found at ``path``).

    A plain module always may; another method's wrapper only when both layer classes are stackable
    (they compute from their base layer's output alone, so the outer one runs on the inner one's result).
    """
    if isinstance(module, BaseTunerLayer) and not (module.stackable and layer_class.stackable):
        refused = type(module).__name__ if not module.stackable else layer_class.__name__
        raise MethodError(f"module {path!r} is already wrapped by {type(module).__name__} and {refused} does not "
                          f"stack with another method on one module; target other modules or use a fresh model")


def is_linear(module: nn.Module, linear_types: tuple[type[nn.Module], ...] = LINEAR_TYPES) -> bool:
    return isinstance(base_of(module), linear_types)


def matches(path: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole path; a name must equal it or be its suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == name or path.endswith(f".{name}") for name in target_modules)


def excluded_heads(model: nn.Module) -> set[str]:
    """Paths that ``all-linear`` leaves out: the output embedding and a classification head."""
    heads: list[nn.Module] = []
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        output = get_output()
        if output is not None:
            heads.append(output)
    heads.extend(getattr(model, name) for name in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module))
    return {path for path, module in candidate_modules(model) if any(module is head for head in heads)}


def default_target_modules(model: nn.Module) -> list[str]:
    """The per-architecture default, or a MethodError asking for ``target_modules``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    kind = f"model type {model_type!r}" if model_type else type(model).__name__
    raise MethodError(f"no default target_modules for {kind}; pass target_modules=[...] or 'all-linear' "
                      f"(available Linear modules: {available_names(model)})")


def find_targets(model: nn.Module, target_modules: Sequence[str] | str,
                 linear_types: tuple[type[nn.Module], ...] = LINEAR_TYPES) -> list[str]:
    """Paths of the modules ``target_modules`` selects, in model order; MethodError when none match."""
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        excluded = excluded_heads(model)
        paths = [path for path, module in candidate_modules(model)
                 if is_linear(module, linear_types) and path not in excluded]
    else:
        pattern = target_modules if isinstance(target_modules, str) else list(target_modules)
        paths = [path for path, _ in candidate_modules(model) if matches(path, pattern)]
    if not paths:
        shown = target_modules if isinstance(target_modules, str) else sorted(target_modules)
        raise MethodError(f"target_modules {shown!r} matched no module; available Linear modules: "
                          f"{available_names(model, linear_types)}")
    return paths


def available_names(model: nn.Module, linear_types: tuple[type[nn.Module], ...] = LINEAR_TYPES) -> str:
    """Sorted leaf names of the linear modules, truncated to one line (for error messages)."""
    names = sorted({path.rsplit(".", 1)[-1] for path, module in candidate_modules(model)
                    if is_linear(module, linear_types)})
    if not names:
        return "none"
    shown = ", ".join(names[:MAX_LISTED_NAMES])
    return shown if len(names) <= MAX_LISTED_NAMES else f"{shown}, ... ({len(names) - MAX_LISTED_NAMES} more)"


def check_regex(target_modules: TargetModules) -> None:
    """A string other than ``all-linear`` is a regex: fail early and clearly when it does not compile."""
    if isinstance(target_modules, str) and target_modules.lower() != ALL_LINEAR:
        try:
            re.compile(target_modules)
        except re.error as error:
            raise MethodError(f"target_modules regex {target_modules!r} is invalid ({error}); "
                              "pass a valid regex, a list of names or 'all-linear'") from None


def replace_module(model: nn.Module, path: str, new: nn.Module | None) -> None:
    """Put ``new`` at ``path`` (``None`` deletes the attribute)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if new is None:
        delattr(parent, name)
    else:
        setattr(parent, name, new)
