"""CoOp: learnable text context for CLIP (Zhou et al., 2022, "Learning to Prompt for Vision-Language
Models", IJCV, arXiv:2109.01134).

The idea: CLIP classifies zero-shot with a hand-written prompt, "a photo of a {class}". CoOp keeps
CLIP frozen and learns the prompt words instead: M continuous context vectors, shared by all classes,
that take the place of the hand-written words in the text encoder's input::

    t_c = [BOS] [V1] [V2] ... [VM] [class c words] [EOS]          (token embeddings + positions)
    p(y = c | x) = exp(τ · cos(f(x), g(t_c))) / Σ_k exp(τ · cos(f(x), g(t_k)))

Only V1..VM (M × D parameters) train, with cross-entropy over the classes of a few-shot training set.
Initialising them from the embeddings of "a photo of a" (``init_token_ids``) starts training exactly
at zero-shot CLIP; the paper's default is N(0, 0.02²).

How the code maps to it: the caller's class prompts keep the template, "a photo of a red circle"
(``ZeroShotClassifier``); :class:`~tunelab.tuners.prompts.clip_layers.TextContextLayer` wraps
``text_model.embeddings.token_embedding`` and replaces the embeddings at positions 1..M (the template
words) by ``prompt[name]`` = [V1..VM]. Positional embeddings, the causal mask and EOS pooling are
CLIP's own, unchanged.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from tunelab.tuners.base import MethodConfig
from tunelab.tuners.prompts import clip_layers


class CoOpConfig(MethodConfig):
    """CoOp options."""

    method = "coop"

    num_virtual_tokens: int = Field(4, gt=0)
    """M, the number of context vectors; the text prompts must start with M placeholder words."""
    init_token_ids: list[int] | None = None
    """Token ids whose embeddings initialise the context (CoOp's ctx_init, e.g. "a photo of a"); None: N(0, 0.02²)."""


def inject(model: nn.Module, config: CoOpConfig, adapter_name: str) -> None:
    """Wrap the text token embedding (or reuse its wrapper) and add the adapter's context vectors."""
    prefix = clip_layers.find_clip(model, "coop")
    path = f"{prefix}text_model.embeddings.token_embedding"
    context = clip_layers.text_context_init(model, path, config.num_virtual_tokens, config.init_token_ids, "coop")
    clip_layers.wrap(model, path, clip_layers.TextContextLayer).add_prompt(adapter_name, context)  # (M, D_text)
