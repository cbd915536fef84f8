"""Prompt learning without a wrapper model: the input-side plumbing shared by prompt and prefix methods.

Prompt tuning, prefix tuning and P-Tuning v2 change no weight and wrap no module: they add *virtual
tokens*. Prompt tuning prepends ``n`` trainable vectors to the input embeddings; prefix methods
prepend ``n`` trainable key/value pairs to every attention layer's cache. HF PEFT does this in a
``PeftModel`` wrapper's ``forward``; tunelab tunes the model in place, so the same edit happens in a
forward pre-hook on the model itself::

    model(input_ids, attention_mask, labels, ...)
      pre-hook:  each attached layer edits the kwargs  (inputs_embeds = [P; E x], cache = [K_P; V_P], ...)
      forward:   the unchanged transformers forward
      post-hook: logits / hidden states of virtual positions are stripped  (B, n + T, .) -> (B, T, .)

The parameters live in a :class:`PromptLearningLayer`, a ``BaseTunerLayer`` with no ``base_layer``
attached to the model as a child module (``model.tunelab_prompt`` / ``model.tunelab_prefix``). So the
generic core needs nothing new: it finds the layer like any wrapper, ``set_active`` / ``disabled``
set its flags (the hook reads them), save/load copy its tensors, ``unload`` removes it (and the hooks).

Bookkeeping every virtual token needs, done here once for both kinds:

- attention mask: ``n`` ones in front (virtual tokens are always attended);
- positions: real tokens sit after the ``n`` virtual ones (positions ``n, n+1, ...``, what PEFT's
  forward gives). Given ``position_ids`` are shifted by ``n``; when none are given and the mask has
  *left* padding, positions are computed from the mask, so a left-padded example gets the positions
  it has alone (HF's forward would count the pads; generate already passes mask-based positions);
- labels (prompt tuning): token-level labels get ``-100`` for the virtual positions (causal LM: the
  loss is PEFT's; token classification: PEFT's shapes would not even match);
- outputs (prompt tuning): the ``n`` virtual positions are stripped from sequence-shaped logits and
  hidden states, so ``model(**batch).logits`` lines up with ``input_ids`` as for the base model.

Generation works through the same hooks: the first (prefill) call has an empty cache and gets the
virtual tokens; later calls see a cache that already holds them and only get the mask / position
bookkeeping. Calling ``model.forward(...)`` directly bypasses hooks (as it bypasses every module hook).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners.base import BaseTunerLayer

PROMPT_ATTRIBUTE = "tunelab_prompt"  # input-embedding prompts (prompt tuning)
PREFIX_ATTRIBUTE = "tunelab_prefix"  # per-layer key/value prefixes (prefix tuning, P-Tuning v2)
LAYER_ORDER = (PROMPT_ATTRIBUTE, PREFIX_ATTRIBUTE)  # prompts first: prefixes shift what prompts produced
CALLS_ATTRIBUTE = "_tunelab_prompt_calls"  # per-call stack: how many positions the post-hook strips


class PromptLearningLayer(BaseTunerLayer):
    """Holds virtual-token parameters beside the model and edits its inputs through model hooks.

    Subclasses implement :meth:`edit_inputs`. The layer keeps a plain (non-module) reference to the
    model that owns it, only to remove the hooks on ``unload``.
    """

    attribute: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(None)
        object.__setattr__(self, "_owner", model)  # plain attribute: not a submodule (that would loop)

    def running(self) -> list[str]:
        """The adapters whose virtual tokens go into this call (none while disabled)."""
        return [] if self.disabled else list(self.active_adapters)

    def edit_inputs(self, model: nn.Module, kwargs: dict[str, Any], names: list[str]) -> int:
        """Rewrite ``kwargs`` for adapters ``names``; return how many leading output positions to strip."""
        raise NotImplementedError

    def unload(self, merge: bool) -> None:
        """Virtual tokens cannot be folded into weights; removing the layer removes its effect."""
        if merge:
            self.merge(list(self.active_adapters))  # raises: prompt adapters are not mergeable
        owner = self.__dict__.get("_owner")
        if owner is not None and not any(getattr(owner, name, None) not in (None, self) for name in LAYER_ORDER):
            remove_hooks(owner)
        return None


def attach(model: nn.Module, layer_class: type[PromptLearningLayer]) -> PromptLearningLayer:
    """The model's layer of ``layer_class`` (created, attached and hooked on first use)."""
    layer = getattr(model, layer_class.attribute, None)
    if layer is None:
        if not callable(getattr(model, "get_input_embeddings", None)) or _config(model) is None:
            raise MethodError(f"{type(model).__name__} is not a transformers model with input embeddings; prompt "
                              "methods need one (e.g. LlamaForCausalLM, BertForSequenceClassification)")
        if getattr(_config(model), "is_encoder_decoder", False):
            raise MethodError("prompt methods support decoder-only and encoder-only models; "
                              f"{type(model).__name__} is an encoder-decoder model")
        layer = layer_class(model)
        setattr(model, layer_class.attribute, layer)
        _ensure_hooks(model)
    elif not isinstance(layer, layer_class):
        raise MethodError(f"model attribute {layer_class.attribute!r} is taken by {type(layer).__name__}; "
                          "rename that module before applying a prompt method")
    return layer


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


# ---------------------------------------------------------------------------------------------- hooks


def _ensure_hooks(model: nn.Module) -> None:
    if _pre_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True, prepend=True)
        model.register_forward_hook(_post_hook, with_kwargs=True)
        model.__dict__[CALLS_ATTRIBUTE] = []


def remove_hooks(model: nn.Module) -> None:
    """Take this module's hooks off ``model`` (what ``RemovableHandle.remove`` does, without handles:
    a handle would not survive ``copy.deepcopy(model)``)."""
    for hooks, with_kwargs, hook in ((model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs, _pre_hook),
                                     (model._forward_hooks, model._forward_hooks_with_kwargs, _post_hook)):
        for key in [key for key, value in hooks.items() if value is hook]:
            del hooks[key]
            with_kwargs.pop(key, None)
    model.__dict__.pop(CALLS_ATTRIBUTE, None)


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    calls = model.__dict__.setdefault(CALLS_ATTRIBUTE, [])
    work = []
    for attribute in LAYER_ORDER:
        layer = getattr(model, attribute, None)
        if isinstance(layer, PromptLearningLayer) and layer.running():
            work.append((layer, layer.running()))
    if not work:
        calls.append((0, None))
        return None
    kwargs = as_kwargs(model, args, kwargs)
    key = cache_key(model, kwargs)
    given = kwargs.get(key)
    strip = sum(layer.edit_inputs(model, kwargs, names) for layer, names in work)
    # A cache the hook created only to carry prefixes must not leak out of a use_cache=False call:
    # generate(use_cache=False) would feed it back and the next step would see the keys twice.
    drop = key if given is None and kwargs.get(key) is not None and kwargs.get("use_cache") is False else None
    calls.append((strip, drop))
    return (), kwargs


def _post_hook(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    calls = model.__dict__.get(CALLS_ATTRIBUTE)
    strip, drop = calls.pop() if calls else (0, None)
    if drop is not None and _get(output, drop) is not None:
        _set(output, drop, None)
    if not strip:
        return output if drop is not None else None
    expected = sequence_length(kwargs)  # kwargs are the edited ones: virtual positions included
    for key in ("logits", "last_hidden_state"):
        value = _get(output, key)
        if isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[1] == expected:
            _set(output, key, value[:, strip:])  # (B, n + T, .) -> (B, T, .)
    hidden = _get(output, "hidden_states")
    if isinstance(hidden, tuple):
        _set(output, "hidden_states", tuple(h[:, strip:] if h.dim() == 3 and h.shape[1] == expected else h
                                            for h in hidden))
    return output


def _get(output: Any, key: str) -> Any:
    return output.get(key) if hasattr(output, "get") else None


def _set(output: Any, key: str, value: Any) -> None:
    output[key] = value  # ModelOutput keeps attribute and item views in sync


# ------------------------------------------------------------------------------------ kwargs helpers


def as_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``forward``'s positional arguments turned into keyword arguments (a fresh dict)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    merged = dict(bound.arguments)
    merged.update(merged.pop("kwargs", {}))
    return merged


def accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def cache_key(model: nn.Module, kwargs: dict) -> str:
    """Where the model takes its KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    if kwargs.get("past_key_values") is not None:
        return "past_key_values"
    return "past_key_values" if accepts(model, "past_key_values") and not accepts(model, "cache") else "cache"


def batch_size(kwargs: dict) -> int:
    source = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if source is None:
        raise MethodError("prompt methods need input_ids or inputs_embeds in the model call")
    return source.shape[0]


def sequence_length(kwargs: dict) -> int:
    source = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    return source.shape[1]


def cached_length(kwargs: dict, key: str) -> int:
    cache = kwargs.get(key)
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        return cache[0][0].shape[-2] if cache else 0
    return cache.get_seq_length()


def extend_attention_mask(kwargs: dict, n: int) -> None:
    """``n`` ones in front of a 2-D mask: (B, S) -> (B, n + S)."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    if mask.dim() != 2:
        raise MethodError("prompt methods need a 2-D attention_mask (batch, sequence); pass the tokenizer's mask")
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)


def has_left_padding(mask: torch.Tensor | None) -> bool:
    """True if some row has a padding position before a real one."""
    if mask is None or mask.dim() != 2:
        return False
    return bool((mask[:, 1:] > mask[:, :-1]).any())


def positions_from_mask(mask: torch.Tensor, offset: int) -> torch.Tensor:
    """(B, S) positions ``offset, offset + 1, ...`` counting only real tokens (pads get ``offset``)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.clamp(min=0) + offset


def token_level(labels: torch.Tensor | None, length: int, model: nn.Module) -> bool:
    """Whether ``labels`` has one entry per input position (causal LM, token classification)."""
    if labels is None or labels.dim() != 2 or labels.shape[1] != length:
        return False
    return not type(model).__name__.endswith("ForSequenceClassification")  # multi-label (B, C) may equal T


def prepend(tensor: torch.Tensor, n: int, value: int) -> torch.Tensor:
    """(B, T) -> (B, n + T) with ``value`` in front."""
    front = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([front, tensor], dim=1)


def check_virtual_tokens(model: nn.Module, names: Sequence[str], n: int) -> None:
    """Refuse inputs that no longer fit the position table once ``n`` virtual tokens are added."""
    limit = getattr(_config(model), "max_position_embeddings", None) or getattr(_config(model), "n_positions", None)
    if limit is not None and n >= limit:
        raise MethodError(f"{n} virtual tokens (adapters {', '.join(names)}) leave no room in the model's "
                          f"{limit} positions; use fewer num_virtual_tokens")
