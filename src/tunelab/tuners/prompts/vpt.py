"""VPT: visual prompt tuning (Jia et al., 2022, "Visual Prompt Tuning", ECCV, arXiv:2203.12119).

The idea: keep the vision transformer frozen and add N learnable tokens to its input sequence.
*Shallow* VPT adds them once, before the first layer; *deep* VPT gives every layer its own tokens,
replacing the previous layer's outputs at the prompt positions::

    shallow:  [x_0, P, E_0]            -> L_1 -> L_2 -> ... -> L_n -> CLS -> head
    deep:     [x_{i-1}, P_{i-1}, E_{i-1}] -> L_i  for every layer i (P_i fresh, the outputs at the
              prompt positions of layer i are discarded)

Here the "head" is CLIP's frozen text side: the image feature (pooled CLS) is compared with the
hand-written class prompts, so only the vision side adapts (the opposite of CoOp).

How the code maps to it: :class:`~tunelab.tuners.prompts.clip_layers.VisionPromptLayer` wraps
``vision_model.embeddings`` and appends P (N × D) after the CLS and patch tokens (before CLIP's
pre-layernorm, as MaPLe's implementation does); with ``deep=True`` each encoder layer i ≥ 1 is wrapped
by :class:`~tunelab.tuners.prompts.clip_layers.VisionDeepPromptLayer`, which overwrites the last N positions
with its own P_i. Tokens start Xavier-uniform with fan = 3·patch² + D, as in the VPT code.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from tunelab.tuners.base import MethodConfig
from tunelab.tuners.prompts import clip_layers


class VPTConfig(MethodConfig):
    """VPT options."""

    method = "vpt"

    num_virtual_tokens: int = Field(4, gt=0)
    """N, prompt tokens per layer."""
    deep: bool = False
    """False: VPT-shallow (prompts at the input only); True: VPT-deep (fresh prompts at every layer)."""


def inject(model: nn.Module, config: VPTConfig, adapter_name: str) -> None:
    """Wrap the vision embeddings (and, deep, every vision layer after the first) and add prompt tokens."""
    prefix = clip_layers.find_clip(model, "vpt")
    vision = model.get_submodule(f"{prefix}vision_model")
    width, patch = vision.config.hidden_size, vision.config.patch_size
    count = config.num_virtual_tokens
    reference = clip_layers.reference_weight(model, f"{prefix}vision_model.embeddings")
    paths = [(f"{prefix}vision_model.embeddings", clip_layers.VisionPromptLayer)]
    if config.deep:
        paths += [(f"{prefix}vision_model.encoder.layers.{i}", clip_layers.VisionDeepPromptLayer)
                  for i in range(1, clip_layers.layer_count(model, prefix, "vision_model"))]
    for path, layer_class in paths:
        tokens = clip_layers.vpt_uniform_tokens(count, width, patch).to(reference)  # (N, D_vision)
        clip_layers.wrap(model, path, layer_class).add_prompt(adapter_name, tokens)
