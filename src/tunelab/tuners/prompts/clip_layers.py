"""Wrapper layers that put learnable prompt tokens into a CLIP model's text and vision encoders.

Shared by CoOp, VPT and MaPLe. Each is a :class:`~tunelab.tuners.base.BaseTunerLayer`, so the generic
core switches, disables, unloads, saves and loads them like LoRA layers. Where they sit in a
``transformers`` CLIP (``text_model`` / ``vision_model`` of ``CLIPModel``)::

    text:   input_ids -> token_embedding -> (+ positions) -> layer 0 -> layer 1 -> ... -> EOS pooling
                         TextContextLayer                    TextDeepPromptLayer (before layer j >= 1)
            [BOS, w1..wM, class words, EOS]  ->  [BOS, V1..VM, class words, EOS]      (replace, length kept)

    vision: pixels -> embeddings (CLS + patches + positions) -> pre-LN -> layer 0 -> layer 1 -> ... -> CLS
                      VisionPromptLayer                                  VisionDeepPromptLayer (layer i >= 1)
            [CLS, patches]  ->  [CLS, patches, P1..PN]                    (append; deep: replace the last N)

- Text prompts *replace* the embeddings of the M prompt words right after ``<bos>`` (CoOp's learnable
  context in place of "a photo of a"), so the sequence length, the causal mask and CLIP's EOS pooling
  are untouched. The caller's prompts must therefore start with M placeholder words (the class template).
- Vision prompts are *appended* after the patch tokens; the CLS token stays at position 0, where
  CLIP pools. Without positional embeddings and with full attention, where they sit does not matter.
- A deep layer replaces the prompt positions of its input hidden states with its own tokens, so every
  layer gets fresh prompts (VPT-deep, MaPLe's first J layers).

Prompt tokens come either from the layer's own parameters (``prompt[name]``, CoOp / VPT) or, for
MaPLe, from a coupling function of a text layer's prompts (``coupling[name]``: a Linear from the text
width to the vision width, applied to ``text_layer.prompt_of(name)``). The text layer is held as a
plain attribute (not a submodule), so its parameters are registered and saved once.

A layer runs at most one adapter at a time (prompts of several adapters would compete for the same
positions); activating two on the same layer raises a MethodError at the next forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners import targets
from tunelab.tuners.base import BaseTunerLayer


def find_clip(model: nn.Module, method: str) -> str:
    """Path prefix ("" or "clip.") of the CLIP-style module inside ``model`` (has text_model and vision_model)."""
    for path, module in model.named_modules():
        if hasattr(module, "text_model") and hasattr(module, "vision_model"):
            return f"{path}." if path else ""
    raise MethodError(f"{method} needs a CLIP-style model with text_model and vision_model (e.g. "
                      f"transformers.CLIPModel); {type(model).__name__} has none")


def layer_count(model: nn.Module, prefix: str, tower: str) -> int:
    return len(model.get_submodule(f"{prefix}{tower}.encoder.layers"))


def hidden_size(model: nn.Module, prefix: str, tower: str) -> int:
    return model.get_submodule(prefix + tower).config.hidden_size


def wrap(model: nn.Module, path: str, layer_class: type[PromptLayer]) -> PromptLayer:
    """The wrapper at ``path``: the existing one, or a new ``layer_class`` around the module there."""
    module = model.get_submodule(path)
    if isinstance(module, layer_class):
        return module
    if isinstance(module, BaseTunerLayer):
        raise MethodError(f"{path} is already wrapped by {type(module).__name__}; prompt methods cannot stack "
                          "on it; call tuners.unload(model) first or use another adapter on a fresh model")
    layer = layer_class(module)
    targets.replace_module(model, path, layer)
    return layer


class PromptLayer(BaseTunerLayer):
    """Base of the prompt wrappers: per-adapter prompt tokens, own (``prompt``) or coupled (``coupling``)."""

    adapter_attribute_names = ("prompt", "coupling")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt = nn.ParameterDict()  # name -> (N, D) tokens
        self.coupling = nn.ModuleDict()  # name -> Linear(D_text, D): MaPLe's vision prompts from text prompts
        self._text_layer: PromptLayer | None = None  # plain attribute, set by set_coupling

    def __getattr__(self, name: str):
        """Fall back to ``base_layer``'s attributes (model code may read e.g. ``embeddings.patch_embedding``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def add_prompt(self, name: str, tokens: torch.Tensor) -> None:
        """Own prompt tokens ``(N, D)`` for adapter ``name``."""
        self.prompt[name] = nn.Parameter(tokens)

    def set_coupling(self, name: str, text_layer: PromptLayer, coupling: nn.Linear) -> None:
        """Adapter ``name``'s tokens are ``coupling(text_layer.prompt_of(name))`` (MaPLe)."""
        self.coupling[name] = coupling
        object.__setattr__(self, "_text_layer", text_layer)

    def prompt_of(self, name: str) -> torch.Tensor:
        """The (N, D) prompt tokens adapter ``name`` puts at this layer."""
        if name in self.prompt:
            return self.prompt[name]
        return self.coupling[name](self._text_layer.prompt_of(name))  # (N, D_text) -> (N, D)

    def active_prompt(self) -> torch.Tensor | None:
        """The one active adapter's tokens, or None (disabled / nothing active here)."""
        if self.disabled or not self.active_adapters:
            return None
        if len(self.active_adapters) > 1:
            raise MethodError(f"adapters {', '.join(self.active_adapters)} are all active on one prompt layer; "
                              "prompt methods run one adapter at a time: call tuners.set_active(model, [name])")
        return self.prompt_of(self.active_adapters[0])


def replace_positions(hidden: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """``hidden`` (B, T, D) with positions ``start .. start+N-1`` replaced by ``tokens`` (N, D)."""
    end = start + tokens.shape[0]
    prompt = tokens.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)  # (B, N, D)
    return torch.cat([hidden[:, :start], prompt, hidden[:, end:]], dim=1)


def replace_text_context(hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Replace the M prompt-word positions after ``<bos>``; the EOS token (pooled by CLIP) must survive."""
    if 1 + tokens.shape[0] >= hidden.shape[1]:
        raise MethodError(f"a text of {hidden.shape[1]} tokens has no room for {tokens.shape[0]} context tokens; "
                          "start every prompt with as many placeholder words as num_virtual_tokens")
    return replace_positions(hidden, tokens, start=1)


class TextContextLayer(PromptLayer):
    """Wraps ``text_model.embeddings.token_embedding``: context vectors replace tokens 1..M (after <bos>)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base_layer(input_ids)  # (B, T, D)
        context = self.active_prompt()
        return embeds if context is None else replace_text_context(embeds, context)


class TextDeepPromptLayer(PromptLayer):
    """Wraps a text encoder layer j >= 1: its input's positions 1..M get this layer's prompts."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        prompt = self.active_prompt()
        if prompt is not None:
            hidden_states = replace_text_context(hidden_states, prompt)
        return self.base_layer(hidden_states, *args, **kwargs)


class VisionPromptLayer(PromptLayer):
    """Wraps ``vision_model.embeddings``: N prompt tokens are appended after CLS and the patches."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        embeds = self.base_layer(*args, **kwargs)  # (B, 1 + patches, D)
        prompt = self.active_prompt()
        if prompt is None:
            return embeds
        prompt = prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)  # (B, N, D)
        return torch.cat([embeds, prompt], dim=1)  # (B, 1 + patches + N, D)


class VisionDeepPromptLayer(PromptLayer):
    """Wraps a vision encoder layer i >= 1: the last N positions (the prompts) get this layer's tokens."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        prompt = self.active_prompt()
        if prompt is not None:
            hidden_states = replace_positions(hidden_states, prompt, start=hidden_states.shape[1] - len(prompt))
        return self.base_layer(hidden_states, *args, **kwargs)


def random_tokens(count: int, width: int, std: float = 0.02) -> torch.Tensor:
    """CoOp / MaPLe's initialisation of learnable context: N(0, std²)."""
    return torch.randn(count, width) * std


def vpt_uniform_tokens(count: int, width: int, patch_size: int, channels: int = 3) -> torch.Tensor:
    """VPT's initialisation: Xavier-uniform with fan = patch pixels + width (Jia et al., 2022, code)."""
    bound = math.sqrt(6.0 / float(channels * patch_size * patch_size + width))
    return torch.empty(count, width).uniform_(-bound, bound)


def reference_weight(model: nn.Module, path: str) -> torch.Tensor:
    """A weight of the (unwrapped) module at ``path``: where new prompt tensors get device and dtype."""
    return next(targets.base_of(model.get_submodule(path)).parameters())


def text_context_init(model: nn.Module, path: str, count: int, token_ids: list[int] | None,
                      method: str) -> torch.Tensor:
    """Initial (M, D) text context: the embeddings of ``token_ids`` (e.g. "a photo of a"), else N(0, 0.02²)."""
    embedding = targets.base_of(model.get_submodule(path))  # nn.Embedding (V, D)
    vocab_size, width = embedding.weight.shape
    if token_ids is None:
        return random_tokens(count, width).to(embedding.weight)
    if len(token_ids) != count:
        raise MethodError(f"{method}: init_token_ids has {len(token_ids)} ids but num_virtual_tokens is {count}; "
                          "pass one id per context token")
    if not all(0 <= i < vocab_size for i in token_ids):
        raise MethodError(f"{method}: init_token_ids must lie in 0..{vocab_size - 1}; tokenize the init words "
                          "with the model's tokenizer")
    return embedding.weight.detach()[torch.tensor(token_ids)].clone()  # (M, D)


def check_depth(model: nn.Module, prefix: str, depth: int, method: str) -> None:
    """Both encoders must have at least ``depth`` layers."""
    for tower in ("text_model", "vision_model"):
        layers = layer_count(model, prefix, tower)
        if depth > layers:
            raise MethodError(f"{method}: prompt_depth={depth} but the {tower} has only {layers} layers; "
                              f"use prompt_depth <= {layers}")
