"""Distillation losses: the student matches the teacher's outputs, features or relations.

Response-based losses compare next-token distributions position by position; feature-based losses
(``tunelab.distill.features``) compare hidden states and attention; relation-based losses
(``tunelab.distill.relations``) compare the geometry of a batch of pooled representations. All are
pure functions of tensors, re-exported here, so an objective is a few lines that call them.

Conventions, shared by every response loss:

- ``student_logits`` and ``teacher_logits`` are ``(B, T, V)`` and already aligned: position ``t`` of
  both predicts the same token. No causal shift happens here (unlike ``tunelab.align.losses``).
- ``mask`` is ``(B, T)``, nonzero/True where a position is scored. ``mask_from_labels(labels)`` turns
  ``labels == IGNORE_INDEX`` into such a mask; an attention mask works as is.
- ``reduction``: ``"mean"`` (mean over scored positions: token-level), ``"sum"``, or ``"none"``
  (the ``(B, T)`` per-position values, zero where masked).

Temperature: p_T = softmax(z_T / T), p_S = softmax(z_S / T). The KL losses are multiplied by T², as
Hinton et al. (2015) advise: the gradient of the softened KL scales as 1/T², so the factor keeps its
magnitude comparable to the hard-label term when T changes. ``generalized_jsd`` follows TRL's GKD
exactly (no T² factor), so the two can be swapped without retuning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from tunelab.distill.common import IGNORE_INDEX, mask_from_labels, reduce_positions
from tunelab.distill.features import (
    FeatureProjector,
    attention_transfer,
    hidden_cosine,
    hidden_mse,
    value_relation,
)
from tunelab.distill.relations import rkd_angle, rkd_distance, similarity_preserving

__all__ = [
    "IGNORE_INDEX",
    "FeatureProjector",
    "attention_transfer",
    "combine",
    "forward_kl",
    "generalized_jsd",
    "hard_label_ce",
    "hidden_cosine",
    "hidden_mse",
    "mask_from_labels",
    "mix_with_hard_labels",
    "reduce_positions",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "schedule_value",
    "similarity_preserving",
    "total_variation",
    "value_relation",
]


def _log_probs(student_logits, teacher_logits, temperature):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    return student_log_probs, teacher_log_probs


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL, the classic soft-target distillation loss (Hinton et al. 2015, arXiv:1503.02531).

        L = T² · KL(p_T ‖ p_S) = T² · Σ_v p_T(v) (log p_T(v) − log p_S(v)),   per position

    Mean-seeking: the student spreads mass over every mode the teacher has.

    Args:
        student_logits: (B, T, V).
        teacher_logits: (B, T, V), aligned with the student's; treated as a constant (detached).
        temperature: softmax temperature T (> 0); the loss is multiplied by T².
        mask: (B, T), nonzero where scored.
        reduction: "mean" (token-level mean over scored positions), "sum" or "none".
    """
    student_log_probs, teacher_log_probs = _log_probs(student_logits, teacher_logits.detach(), temperature)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)  # (B, T)
    return reduce_positions(kl * temperature**2, mask, reduction)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reverse KL, as in MiniLLM (Gu et al. 2024, arXiv:2306.08543).

        L = T² · KL(p_S ‖ p_T) = T² · Σ_v p_S(v) (log p_S(v) − log p_T(v)),   per position

    Mode-seeking: the student concentrates on the teacher's main modes instead of covering all of
    them, which suits generative students much smaller than their teacher. Arguments as ``forward_kl``.
    """
    student_log_probs, teacher_log_probs = _log_probs(student_logits, teacher_logits.detach(), temperature)
    kl = (student_log_probs.exp() * (student_log_probs - teacher_log_probs)).sum(-1)  # (B, T)
    return reduce_positions(kl * temperature**2, mask, reduction)


def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Total variation distance (as in DistiLLM / DistillKit's ``tvd``; Wen et al. 2023, arXiv:2307.15190).

        L = ½ Σ_v |p_T(v) − p_S(v)|,   per position, in [0, 1]

    Bounded and symmetric; no T² factor (it is a distance between probabilities, not a log-ratio).
    Arguments as ``forward_kl``.
    """
    student_log_probs, teacher_log_probs = _log_probs(student_logits, teacher_logits.detach(), temperature)
    tv = 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)  # (B, T)
    return reduce_positions(tv, mask, reduction)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Generalized Jensen–Shannon divergence of GKD (Agarwal et al. 2024, arXiv:2306.13649, Eq. 1).

        m = β p_T + (1 − β) p_S
        JSD_β = β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m),     0 < β < 1
        JSD_0 = KL(p_T ‖ p_S)   (forward KL)          JSD_1 = KL(p_S ‖ p_T)   (reverse KL)

    Matches TRL's ``GKDTrainer.generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py) value for
    value: the same β endpoints, temperature applied to both logits with no T² factor, and the same
    reductions. ``"batchmean"`` divides the summed divergence by the number of scored positions when
    a mask is given, else by B (TRL's convention: sum over T and V, per sequence); ``"mean"``
    averages over every element of the (scored positions × V) tensor as ``torch.mean`` does.
    Unlike TRL, the teacher is detached here.

    Args:
        student_logits, teacher_logits: (B, T, V), aligned.
        beta: interpolation β in [0, 1].
        temperature: softmax temperature (> 0).
        mask: (B, T), nonzero where scored; or give ``labels`` (IGNORE_INDEX = not scored).
        labels: (B, T) token labels, the TRL way of masking.
        reduction: "batchmean", "sum", "mean", or "none" (the (N, V) per-element values of the kept
            positions, as TRL returns them).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if labels is not None:
        mask = mask_from_labels(labels) if mask is None else mask.bool() & mask_from_labels(labels)
    student_log_probs, teacher_log_probs = _log_probs(student_logits, teacher_logits.detach(), temperature)
    if beta == 0:
        jsd = teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)  # (B, T, V)
    elif beta == 1:
        jsd = student_log_probs.exp() * (student_log_probs - teacher_log_probs)
    else:
        # log m = logsumexp(log p_S + log(1-β), log p_T + log β), stable in log space
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + math.log1p(-beta), teacher_log_probs + math.log(beta)]), dim=0
        )
        kl_teacher = teacher_log_probs.exp() * (teacher_log_probs - mixture_log_probs)
        kl_student = student_log_probs.exp() * (student_log_probs - mixture_log_probs)
        jsd = beta * kl_teacher + (1 - beta) * kl_student  # (B, T, V)
    if mask is not None:
        jsd = jsd[mask.bool()]  # (N, V)
    if reduction == "batchmean":
        denominator = mask.bool().sum().clamp_min(1) if mask is not None else max(jsd.size(0), 1)
        return jsd.sum() / denominator
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    if reduction == "none":
        return jsd
    raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}")


def hard_label_ce(
    student_logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy on the hard labels, −log p_S(y_t) at temperature 1, over ``labels != IGNORE_INDEX``.

    ``student_logits`` (B, T, V) and ``labels`` (B, T) are aligned (no shift), like the other
    response losses. Combine with a soft loss through ``mix_with_hard_labels``.
    """
    per_position = F.cross_entropy(
        student_logits.float().flatten(0, 1), labels.flatten().clamp_min(0), reduction="none"
    ).view(labels.shape)  # (B, T)
    return reduce_positions(per_position, mask_from_labels(labels), reduction)


def mix_with_hard_labels(
    cross_entropy: torch.Tensor, distillation: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``alpha · cross_entropy + (1 − alpha) · distillation``: α weighs the hard labels.

    α = 0 is pure distillation, α = 1 is plain supervised training. Hinton et al. weight the soft
    term by T² to keep the two gradients on one scale; ``forward_kl`` / ``reverse_kl`` already carry it.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * cross_entropy + (1.0 - alpha) * distillation


def combine(terms: Mapping[str, tuple[float, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of named loss terms: L = Σ_k w_k · L_k.

    Args:
        terms: name -> (weight, scalar loss tensor).

    Returns:
        (total, metrics): the differentiable total, and for logging each term's *unweighted* value
        under its name plus the total under ``"loss"``.
    """
    if not terms:
        raise ValueError("combine needs at least one term")
    total = sum(weight * value for weight, value in terms.values())
    metrics = {name: float(value.detach()) for name, (_, value) in terms.items()}
    metrics["loss"] = float(total.detach())
    return total, metrics


def schedule_value(kind: str, start: float, end: float, step: int, total_steps: int) -> float:
    """Value of a per-step schedule, for the temperature or the hard-label weight α.

        constant: start
        linear:   start + (end − start) · p
        cosine:   end + (start − end) · ½ (1 + cos(π p))
    with progress p = min(step / total_steps, 1); past ``total_steps`` the value stays at ``end``.
    """
    if kind == "constant":
        return float(start)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(max(step, 0) / total_steps, 1.0)
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule kind must be 'constant', 'linear' or 'cosine', got {kind!r}")
