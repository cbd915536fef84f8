"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

    model input:  [ P_1 ... P_n ; E(x_1) ... E(x_T) ]       P in R^{n x d} trainable, the model frozen
    labels:       [ -100 ... -100 ; y_1 ... y_T ]            token-level labels only
    mask:         [ 1 ... 1 ; m_1 ... m_T ]

Only the ``n`` virtual token embeddings ``P`` train; they are prepended to the input embeddings
``E(x)`` of every example (https://arxiv.org/abs/2104.08691). Initialisation
(``prompt_tuning_init``), as in the paper and HF PEFT:

- ``RANDOM``: uniform in [-0.5, 0.5] (the paper's choice; PEFT draws N(0, 1));
- ``SAMPLE_VOCAB``: embeddings of ``n`` tokens drawn uniformly from the vocabulary (the paper draws
  from the 5,000 most frequent tokens; tunelab knows no frequencies, so it samples as PEFT does);
- ``TEXT``: embeddings of ``prompt_tuning_init_text`` tokenized as PEFT does (special tokens
  included), cut or repeated to ``n`` tokens. The token ids are stored in the config
  (``prompt_tuning_init_token_ids``) so a saved adapter loads without the tokenizer.

How the code maps to it: :class:`PromptEmbeddingLayer` holds ``P`` per adapter
(``prompt_embeddings[name]``, shape (n, d)) and is attached to the model as ``model.tunelab_prompt``;
its :meth:`~PromptEmbeddingLayer.edit_inputs`, called from the model's forward pre-hook
(``prompt_learning``), builds ``inputs_embeds`` and extends mask, labels, positions and token types.
Logits come back with the ``n`` virtual positions stripped, so they line up with ``input_ids``
(PEFT returns them unstripped; parity tests compare ``peft_logits[:, n:]``). Several active adapters
concatenate their prompts in activation order. During generation the prompts enter once, at prefill;
later steps find them in the KV cache.

Known limit: a decoder *sequence classifier* (``LlamaForSequenceClassification``) finds the last real
token from ``input_ids``; with prompts the model only sees ``inputs_embeds`` and takes the last
position, so pad such batches on the left (P-Tuning v2 keeps ``input_ids`` and has no such limit).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab import IGNORE_INDEX
from tunelab.errors import MethodError, ModelError
from tunelab.tuners.base import MethodConfig
from tunelab.tuners.prompts.prompt_learning import (
    PROMPT_ATTRIBUTE,
    PromptLearningLayer,
    accepts,
    attach,
    cache_key,
    cached_length,
    check_virtual_tokens,
    extend_attention_mask,
    has_left_padding,
    positions_from_mask,
    prepend,
    token_level,
)

RANDOM_INIT_RANGE = 0.5  # Lester et al.: uniform in [-0.5, 0.5]


class PromptTuningConfig(MethodConfig):
    """Options of prompt tuning (HF PEFT's ``PromptTuningConfig`` names).

    Attributes:
        num_virtual_tokens: prompt length ``n`` (Lester et al. find 20 enough at scale; 100 saturates).
        prompt_tuning_init: ``RANDOM``, ``SAMPLE_VOCAB`` or ``TEXT``.
        prompt_tuning_init_text: the text whose token embeddings start the prompt (``TEXT``).
        tokenizer_name_or_path: a local tokenizer directory for ``TEXT`` (or pass ``tokenizer``).
        tokenizer: a tokenizer object for ``TEXT``; used at apply time, never saved.
        prompt_tuning_init_token_ids: the ``TEXT`` token ids, resolved at apply time (saved).
        modules_to_save: modules that train in full beside the prompt (e.g. a new ``classifier``).
    """

    method = "prompt_tuning"

    num_virtual_tokens: int = Field(20, ge=1)
    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer: Any = Field(None, exclude=True)
    prompt_tuning_init_token_ids: list[int] | None = None
    modules_to_save: list[str] | None = None

    @model_validator(mode="after")
    def _text_init_needs_text(self) -> PromptTuningConfig:
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_token_ids:
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs tokenizer (an object) or tokenizer_name_or_path")
        return self


class PromptEmbeddingLayer(PromptLearningLayer):
    """``prompt_embeddings[name]``: (n, d) virtual token embeddings, prepended to the input embeddings."""

    attribute = PROMPT_ATTRIBUTE
    adapter_attribute_names = ("prompt_embeddings",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.prompt_embeddings = nn.ParameterDict()

    def add_adapter(self, name: str, initial: torch.Tensor) -> None:
        self.prompt_embeddings[name] = nn.Parameter(initial.float())  # fp32 master copy, as PEFT keeps

    def num_virtual_tokens(self, names: list[str]) -> int:
        return sum(self.prompt_embeddings[name].shape[0] for name in names)

    def forward(self, names: list[str]) -> torch.Tensor:
        """(n_total, d): the prompts of ``names``, concatenated in order."""
        return torch.cat([self.prompt_embeddings[name] for name in names], dim=0)

    def edit_inputs(self, model: nn.Module, kwargs: dict[str, Any], names: list[str]) -> int:
        n = self.num_virtual_tokens(names)
        positions = kwargs.get("position_ids")
        if cached_length(kwargs, cache_key(model, kwargs)) > 0:
            # Decoding: the prompts went in at prefill and sit in the cache; keep mask and positions in step.
            extend_attention_mask(kwargs, n)
            if positions is not None:
                kwargs["position_ids"] = positions + n
            return 0
        check_virtual_tokens(model, names, n)
        embeds = kwargs.pop("inputs_embeds", None)
        input_ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)  # (B, T, d)
        batch = embeds.shape[0]
        prompts = self(names).to(embeds.dtype)  # (n, d)
        kwargs["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
        extend_attention_mask(kwargs, n)
        if positions is not None:  # (B or 1, T) -> virtual tokens take 0..n-1, real tokens shift by n
            front = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
            kwargs["position_ids"] = torch.cat([front, positions + n], dim=1)
        elif has_left_padding(kwargs.get("attention_mask")) and accepts(model, "position_ids"):
            kwargs["position_ids"] = positions_from_mask(kwargs["attention_mask"], 0)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = prepend(kwargs["token_type_ids"], n, 0)
        labels = kwargs.get("labels")
        if labels is not None and token_level(labels, embeds.shape[1], model):
            kwargs["labels"] = prepend(labels, n, IGNORE_INDEX)
        return n


def inject(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> list[str]:
    """Attach (or reuse) the model's prompt layer and add adapter ``adapter_name`` to it."""
    layer = attach(model, PromptEmbeddingLayer)
    embeddings = model.get_input_embeddings()  # (V, d)
    if config.prompt_tuning_init == "TEXT" and not config.prompt_tuning_init_token_ids:
        config.prompt_tuning_init_token_ids = _text_token_ids(config)
    config.tokenizer = None  # resolved into token ids; never keep a tokenizer inside a saved config
    layer.add_adapter(adapter_name, initial_prompt(config, embeddings))
    return [PROMPT_ATTRIBUTE]


def initial_prompt(config: PromptTuningConfig, embeddings: nn.Module) -> torch.Tensor:
    """(n, d) starting values of the prompt under ``config.prompt_tuning_init``."""
    n, weight = config.num_virtual_tokens, embeddings.weight
    if config.prompt_tuning_init == "RANDOM":
        return torch.empty(n, weight.shape[1]).uniform_(-RANDOM_INIT_RANGE, RANDOM_INIT_RANGE)
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, weight.shape[0], (n,), dtype=torch.long)
    else:
        ids = torch.tensor(repeat_to(config.prompt_tuning_init_token_ids, n), dtype=torch.long)
    if int(ids.max()) >= weight.shape[0]:
        raise MethodError(f"prompt_tuning_init_text has token id {int(ids.max())} but the model's vocabulary has "
                          f"{weight.shape[0]} entries; pass the model's own tokenizer")
    return embeddings(ids.to(weight.device)).detach().clone().float().cpu()


def repeat_to(ids: list[int], n: int) -> list[int]:
    """PEFT's rule: cut to ``n`` ids, or repeat the whole sequence until ``n`` are reached."""
    return (ids * math.ceil(n / len(ids)))[:n]


def _text_token_ids(config: PromptTuningConfig) -> list[int]:
    tokenizer = config.tokenizer
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load tokenizer {config.tokenizer_name_or_path!r} for prompt_tuning_init='TEXT' "
                             f"({type(error).__name__}); pass a local path or the tokenizer object as tokenizer=") from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise MethodError("prompt_tuning_init_text tokenizes to no tokens; pass a non-empty text")
    return ids
