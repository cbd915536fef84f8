"""Feature-based distillation: the student's intermediate states match the teacher's.

- FitNets (Romero et al. 2015, arXiv:1412.6550): hidden states, through a learned linear projection
  when the widths differ -> ``hidden_mse``, ``hidden_cosine``, ``FeatureProjector``.
- TinyBERT (Jiao et al. 2020, arXiv:1909.10351): attention matrices -> ``attention_transfer``.
- MiniLM (Wang et al. 2020, arXiv:2002.10957): self-attention value relations -> ``value_relation``.

Hidden states come from ``tunelab.models.hooks.FeatureTap`` (or ``output_hidden_states``), shaped
(B, T, D); masks are (B, T), nonzero where a position counts. Teacher tensors are detached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.distill.common import reduce_positions


class FeatureProjector(nn.Module):
    """Learned linear maps from student widths to teacher widths, one per named layer pair.

    ``FeatureProjector({"layer2->layer6": (256, 512)})`` holds ``Linear(256, 512)`` for that pair;
    pairs whose widths are equal get an identity unless ``project_equal_widths=True``. The objective
    returns it from ``modules()``, so it trains with the student and checkpoints with it.
    """

    def __init__(self, pairs: Mapping[str, tuple[int, int]], project_equal_widths: bool = False):
        super().__init__()
        self.names = list(pairs)
        self.projections = nn.ModuleDict()
        for name, (student_width, teacher_width) in pairs.items():
            if student_width == teacher_width and not project_equal_widths:
                layer = nn.Identity()
            else:
                layer = nn.Linear(student_width, teacher_width)
            self.projections[self._key(name)] = layer

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ModuleDict keys may not contain "."

    def forward(self, name: str, student_hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D_student) -> (B, T, D_teacher) for the layer pair ``name``."""
        return self.projections[self._key(name)](student_hidden)


def _project(student_hidden, teacher_hidden, projection):
    if projection is not None:
        student_hidden = projection(student_hidden)
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"student width {student_hidden.shape[-1]} != teacher width {teacher_hidden.shape[-1]}; "
            "pass a projection (FeatureProjector) to map between them"
        )
    return student_hidden.float(), teacher_hidden.detach().float()


def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    projection: nn.Module | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """FitNets hint loss: mean squared error between (projected) hidden states.

        L_t = (1/D) ‖W h_S,t − h_T,t‖²,    averaged over the scored positions t

    Args:
        student_hidden: (B, T, D_S).
        teacher_hidden: (B, T, D_T).
        projection: maps D_S -> D_T (e.g. ``lambda h: projector(name, h)``); required if widths differ.
        mask: (B, T).
        reduction: "mean", "sum" or "none" over positions.
    """
    student, teacher = _project(student_hidden, teacher_hidden, projection)
    per_position = (student - teacher).pow(2).mean(-1)  # (B, T)
    return reduce_positions(per_position, mask, reduction)


def hidden_cosine(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    projection: nn.Module | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cosine hint loss (DistilBERT's cosine embedding loss; DistillKit's hidden-state cosine).

    L_t = 1 − cos(W h_S,t, h_T,t),    in [0, 2]; arguments as ``hidden_mse``
    """
    student, teacher = _project(student_hidden, teacher_hidden, projection)
    per_position = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)  # (B, T)
    return reduce_positions(per_position, mask, reduction)


def attention_transfer(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TinyBERT attention-based distillation: MSE between attention matrices.

        L = (1 / (H · |valid pairs|)) Σ_h Σ_(i,j) (A^S_h,ij − A^T_h,ij)²

    A pair (i, j) is valid when both query i and key j are unmasked. Works on the probabilities that
    ``output_attentions`` returns, or on pre-softmax scores as TinyBERT's code does (then masked
    scores must be finite). Student and teacher need the same number of heads.

    Args:
        student_attention, teacher_attention: (B, H, T, T).
        mask: (B, T) attention mask.
    """
    if student_attention.shape != teacher_attention.shape:
        raise ValueError(
            f"attention shapes differ: {tuple(student_attention.shape)} vs {tuple(teacher_attention.shape)}"
        )
    squared = (student_attention.float() - teacher_attention.detach().float()).pow(2)  # (B, H, T, T)
    if mask is None:
        return squared.mean()
    keep = mask.float()
    pair_mask = (keep[:, :, None] * keep[:, None, :])[:, None]  # (B, 1, T, T)
    count = pair_mask.sum() * squared.shape[1]
    return (squared * pair_mask).sum() / count.clamp_min(1.0)


def _value_relation_log_probs(values, num_heads, key_mask):
    batch, length, width = values.shape
    if width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    head_dim = width // num_heads
    heads = values.float().view(batch, length, num_heads, head_dim).transpose(1, 2)  # (B, H, T, d)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(head_dim)  # (B, H, T, T)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def value_relation(
    student_values: torch.Tensor,
    teacher_values: torch.Tensor,
    num_heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLM self-attention value-relation transfer.

        VR_h = softmax(V_h V_hᵀ / √d_h)    (per head h; d_h = D / num_heads)
        L = (1 / (H · |queries|)) Σ_h Σ_i KL(VR^T_h,i ‖ VR^S_h,i)

    Relations are T × T whatever the width, so student and teacher widths may differ; both are split
    into ``num_heads`` heads (MiniLMv2's relation heads). Masked keys get no mass, masked queries
    are not averaged.

    Args:
        student_values: (B, T, D_S), the last layer's value vectors (heads concatenated).
        teacher_values: (B, T, D_T).
        num_heads: relation heads, dividing both widths.
        mask: (B, T) attention mask.
    """
    student_log = _value_relation_log_probs(student_values, num_heads, mask)  # (B, H, T, T)
    teacher_log = _value_relation_log_probs(teacher_values.detach(), num_heads, mask)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)  # (B, H, T)
    if mask is None:
        return kl.mean()
    query_mask = mask.float()[:, None, :]  # (B, 1, T)
    return (kl * query_mask).sum() / (query_mask.sum() * kl.shape[1]).clamp_min(1.0)
