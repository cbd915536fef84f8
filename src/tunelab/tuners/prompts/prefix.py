"""Prefix tuning with reparameterization (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts").

At every attention layer l, ``n`` trainable key/value vectors are put in front of the real ones::

    head_i(x) = softmax( Q_i [K_P^{l,i}; K_i]^T / sqrt(d) ) [V_P^{l,i}; V_i]          (per head i)

so every token attends to the prefix and the frozen model is steered at every layer
(https://arxiv.org/abs/2101.00190). Directly optimising ``P`` is unstable, so the paper trains a
*reparameterization*: a small embedding ``E`` (n x d_token) through an MLP,

    P = MLP(E) = W_2 tanh(W_1 E + b_1) + b_2,      P in R^{n x (L * 2 * d_kv)}

(``prefix_projection=True``; ``encoder_hidden_size`` is the MLP width, HF PEFT's names). After
training only ``P`` matters: :func:`fold` replaces ``E`` and the MLP by the prefixes they compute,
and ``save(format="peft")`` always writes the folded ``P`` (PEFT's ``prompt_embeddings``), as PEFT
does. Without projection ``P`` itself is the parameter. Initialisation follows PEFT: ``E`` (or ``P``)
~ N(0, 1), the MLP with PyTorch's Linear default.

How the code maps to it: :class:`PrefixLayer` (``model.tunelab_prefix``) holds per adapter
``prefix_embeddings[name]`` (``P`` or ``E``) and ``prefix_mlp[name]``. In the model's forward
pre-hook (``prompt_learning``) it views ``P`` as (2L, H_kv, n, d_head), the same layout as PEFT's
``get_prompt`` (layer l: keys at row 2l, values at 2l+1), and writes it into an empty KV cache
(``DynamicCache``) before the model runs; the model then concatenates its own keys/values behind
it. With grouped-query attention the prefix has ``num_key_value_heads`` heads (PEFT's layout). The
attention mask gets ``n`` ones in front; real tokens take positions ``n, n+1, ...`` (PEFT's), computed
from the mask when it is left-padded so that a padded batch gives each example's solo outputs.

Generation: the first call sees an empty cache and receives the prefix; the cache then keeps it,
so decoding steps only extend the mask and positions. Logits keep their shape (no virtual inputs).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn
from transformers import DynamicCache

from tunelab.errors import MethodError
from tunelab.tuners.base import MethodConfig, get_state
from tunelab.tuners.prompts.prompt_learning import (
    PREFIX_ATTRIBUTE,
    PromptLearningLayer,
    accepts,
    attach,
    batch_size,
    cache_key,
    cached_length,
    check_virtual_tokens,
    extend_attention_mask,
    has_left_padding,
    positions_from_mask,
    sequence_length,
)


class PrefixTuningConfig(MethodConfig):
    """Options of prefix tuning (HF PEFT's ``PrefixTuningConfig`` names).

    Attributes:
        num_virtual_tokens: prefix length ``n`` per layer (Li & Liang: 5-10 for generation tasks).
        prefix_projection: train ``P = MLP(E)`` (the paper's reparameterization) instead of ``P``.
        encoder_hidden_size: the MLP's hidden width; ``None`` means the key/value width (PEFT).
        modules_to_save: modules that train in full beside the prefix (e.g. a new ``classifier``).
    """

    method = "prefix_tuning"

    num_virtual_tokens: int = Field(20, ge=1)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(None, ge=1)
    modules_to_save: list[str] | None = None


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers model's self-attention."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (layers and heads and hidden):
        raise MethodError(f"cannot read layers/heads/hidden size from {type(config).__name__}; prefix methods "
                          "need a transformers config with num_hidden_layers, num_attention_heads and hidden_size")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


class PrefixLayer(PromptLearningLayer):
    """``prefix_embeddings[name]``: P (n, 2 L H d) or E (n, H d); ``prefix_mlp[name]``: E -> P."""

    attribute = PREFIX_ATTRIBUTE
    adapter_attribute_names = ("prefix_embeddings", "prefix_mlp")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.geometry = kv_geometry(model)
        self.prefix_embeddings = nn.ParameterDict()
        self.prefix_mlp = nn.ModuleDict()

    @property
    def token_dim(self) -> int:
        _, heads, head_dim = self.geometry
        return heads * head_dim

    @property
    def width(self) -> int:
        """Values per virtual token: a key and a value per layer."""
        return self.geometry[0] * 2 * self.token_dim

    def add_adapter(self, name: str, num_virtual_tokens: int, projection: bool, encoder_hidden_size: int) -> None:
        if projection:
            self.prefix_embeddings[name] = nn.Parameter(torch.randn(num_virtual_tokens, self.token_dim))
            self.prefix_mlp[name] = nn.Sequential(nn.Linear(self.token_dim, encoder_hidden_size), nn.Tanh(),
                                                  nn.Linear(encoder_hidden_size, self.width))
        else:
            self.prefix_embeddings[name] = nn.Parameter(torch.randn(num_virtual_tokens, self.width))

    def prefixes(self, name: str) -> torch.Tensor:
        """(n, 2 L H d): the adapter's prefixes, through the MLP when it has one."""
        embedding = self.prefix_embeddings[name]
        return self.prefix_mlp[name](embedding) if name in self.prefix_mlp else embedding

    def num_virtual_tokens(self, names: list[str]) -> int:
        return sum(self.prefix_embeddings[name].shape[0] for name in names)

    def forward(self, names: list[str], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each (B, H, n_total, d): the prefixes of ``names``, concatenated."""
        layers, heads, head_dim = self.geometry
        prefixes = torch.cat([self.prefixes(name) for name in names], dim=0)  # (n, 2 L H d)
        n = prefixes.shape[0]
        prefixes = prefixes.view(n, 2 * layers, heads, head_dim).permute(1, 2, 0, 3)  # (2L, H, n, d)
        return [(prefixes[2 * layer].expand(batch, -1, -1, -1), prefixes[2 * layer + 1].expand(batch, -1, -1, -1))
                for layer in range(layers)]

    def edit_inputs(self, model: nn.Module, kwargs: dict[str, Any], names: list[str]) -> int:
        n = self.num_virtual_tokens(names)
        key = cache_key(model, kwargs)
        if cached_length(kwargs, key) == 0:  # a fresh forward or generation's prefill: insert the prefix
            check_virtual_tokens(model, names, n)
            dtype = model.get_input_embeddings().weight.dtype
            cache = kwargs.get(key)
            if cache is None:
                cache = DynamicCache(config=model.config)
            for layer, (keys, values) in enumerate(self(names, batch_size(kwargs))):
                cache.update(keys.to(dtype), values.to(dtype), layer)
            kwargs[key] = cache
        positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        if positions is not None:
            kwargs["position_ids"] = positions + n
        elif has_left_padding(mask) and accepts(model, "position_ids"):
            kwargs["position_ids"] = positions_from_mask(mask, n)[:, -sequence_length(kwargs):]
        extend_attention_mask(kwargs, n)
        return 0


def inject(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> list[str]:
    """Attach (or reuse) the model's prefix layer and add adapter ``adapter_name`` to it."""
    layer = attach(model, PrefixLayer)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = layer.token_dim  # PEFT's default: the key/value width
    layer.add_adapter(adapter_name, config.num_virtual_tokens, config.prefix_projection, config.encoder_hidden_size)
    return [PREFIX_ATTRIBUTE]


@torch.no_grad()
def folded_prefixes(model: nn.Module, adapter_name: str) -> torch.Tensor:
    """(n, 2 L H d): what adapter ``adapter_name`` puts in the cache (its MLP applied, if it has one)."""
    layer = getattr(model, PREFIX_ATTRIBUTE, None)
    if not isinstance(layer, PrefixLayer) or adapter_name not in layer.prefix_embeddings:
        raise MethodError(f"the model has no prefix adapter {adapter_name!r}; apply prefix_tuning or p_tuning_v2 first")
    return layer.prefixes(adapter_name).detach().clone()


def fold(model: nn.Module, adapter_names: list[str] | None = None) -> list[str]:
    """Fold the reparameterization away: replace ``E`` and the MLP by ``P = MLP(E)``.

    The outputs do not change; the adapter becomes a plain (``prefix_projection=False``) prefix whose
    ``P`` stays trainable. Call it after training (optimizers hold the old parameters). Returns the
    names that were folded.
    """
    layer = getattr(model, PREFIX_ATTRIBUTE, None)
    state = get_state(model)
    if not isinstance(layer, PrefixLayer) or state is None:
        raise MethodError("the model has no prefix adapters; apply prefix_tuning or p_tuning_v2 first")
    names = list(layer.prefix_mlp) if adapter_names is None else list(adapter_names)
    folded = []
    for name in names:
        if name not in layer.prefix_mlp:
            continue  # already plain prefixes
        prefixes = folded_prefixes(model, name)
        trainable = layer.prefix_embeddings[name].requires_grad
        layer.prefix_embeddings[name] = nn.Parameter(prefixes, requires_grad=trainable)
        del layer.prefix_mlp[name]
        state.configs[name] = state.configs[name].model_copy(update={"prefix_projection": False})
        folded.append(name)
    return folded
