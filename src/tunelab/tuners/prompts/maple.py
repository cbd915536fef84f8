"""MaPLe: multi-modal prompt learning (Khattak et al., 2023, "MaPLe: Multi-modal Prompt Learning",
CVPR, arXiv:2210.03117).

The idea: prompt *both* branches of CLIP, deeply, and couple them so that the two sides adapt in
step. Text prompts are learned at the first J layers of the text encoder; the vision prompts of the
same layers are not free parameters but a learned linear function of the text prompts::

    layer 0:      text  [BOS, P_0, class words, EOS]     P_0 ∈ ℝ^{M×d_t} (init: "a photo")
                  image [CLS, patches, F_0(P_0)]          F_0: ℝ^{d_t} → ℝ^{d_v}, a Linear
    layer j < J:  text positions 1..M  ← P_j              P_j ~ N(0, 0.02²)
                  image last M positions ← F_j(P_j)       one coupling function F_j per layer
    layer j ≥ J:  both encoders run on their own outputs (no new prompts)

Trainable: the P_j (J · M · d_t) and the F_j (J · (d_t · d_v + d_v)). Gradients reach the text
prompts through both branches, which is the point of the coupling ("vision-language coupling" in the
paper); MaPLe's defaults for ViT-B/16 are M = 2 and J = 9 of 12 layers.

How the code maps to it: ``P_0`` is the ``prompt`` of a
:class:`~tunelab.tuners.prompts.clip_layers.TextContextLayer` on the token embedding, ``P_j`` of a
:class:`~tunelab.tuners.prompts.clip_layers.TextDeepPromptLayer` on text layer j; the vision wrappers
(:class:`~tunelab.tuners.prompts.clip_layers.VisionPromptLayer` on the embeddings, ``VisionDeepPromptLayer`` on
layer j) hold ``coupling[name]`` = F_j and compute their tokens as ``F_j(P_j)`` from their text twin.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from tunelab.tuners.base import MethodConfig
from tunelab.tuners.prompts import clip_layers


class MaPLeConfig(MethodConfig):
    """MaPLe options."""

    method = "maple"

    num_virtual_tokens: int = Field(2, gt=0)
    """M, prompt tokens per layer and branch (the paper's n_ctx = 2)."""
    prompt_depth: int = Field(2, ge=1)
    """J, how many layers (from the first) get prompts; at most the number of layers of either encoder."""
    init_token_ids: list[int] | None = None
    """Token ids whose embeddings initialise P_0 (the paper: the first M words of "a photo of a"); None: N(0, 0.02²)."""


def inject(model: nn.Module, config: MaPLeConfig, adapter_name: str) -> None:
    """Wrap the first J positions of both encoders; text layers get prompts, vision layers couplings."""
    prefix = clip_layers.find_clip(model, "maple")
    clip_layers.check_depth(model, prefix, config.prompt_depth, "maple")
    count, depth = config.num_virtual_tokens, config.prompt_depth
    text_width = clip_layers.hidden_size(model, prefix, "text_model")
    vision_width = clip_layers.hidden_size(model, prefix, "vision_model")
    embedding = f"{prefix}text_model.embeddings.token_embedding"
    reference = clip_layers.reference_weight(model, embedding)
    first = clip_layers.text_context_init(model, embedding, count, config.init_token_ids, "maple")
    text_tokens = [first] + [clip_layers.random_tokens(count, text_width).to(reference) for _ in range(1, depth)]
    text_paths = [(embedding, clip_layers.TextContextLayer)] + [
        (f"{prefix}text_model.encoder.layers.{j}", clip_layers.TextDeepPromptLayer) for j in range(1, depth)]
    vision_paths = [(f"{prefix}vision_model.embeddings", clip_layers.VisionPromptLayer)] + [
        (f"{prefix}vision_model.encoder.layers.{j}", clip_layers.VisionDeepPromptLayer) for j in range(1, depth)]
    for tokens, (text_path, text_class), (vision_path, vision_class) in zip(
            text_tokens, text_paths, vision_paths, strict=True):
        text_layer = clip_layers.wrap(model, text_path, text_class)
        text_layer.add_prompt(adapter_name, tokens)  # P_j (M, d_t)
        coupling = nn.Linear(text_width, vision_width).to(reference)  # F_j
        clip_layers.wrap(model, vision_path, vision_class).set_coupling(adapter_name, text_layer, coupling)
