"""Alignment losses: preferences (DPO family, ORPO, SimPO, KTO), reward models, and PPO / GRPO maths.

Pure functions of tensors, named and shaped as in TRL so its users' knowledge transfers; the
objectives (``dpo``, ``kto``, ``reward``, ``ppo``, ``grpo``) call them. Preference losses take
per-sequence log-probabilities, log π(y | x) = Σ_t log π(y_t | x, y_<t) over the completion tokens,
which ``sequence_logps`` computes from logits. The RL pieces live in ``tunelab.align.rl`` and are
re-exported here.

Every preference loss returns per-example ``losses`` (reduce them with ``.mean()``, as TRL does)
and the implicit rewards as *detached* tensors, for logging chosen/rejected rewards, margins and
accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab import IGNORE_INDEX  # the one definition; re-exported for older imports
from tunelab.align.rl import (
    AdaptiveKLController,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    value_loss,
)

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

__all__ = [
    "DPO_LOSS_TYPES",
    "IGNORE_INDEX",
    "AdaptiveKLController",
    "chosen_nll",
    "dpo_loss",
    "gae",
    "grpo_advantages",
    "kl_penalty",
    "kto_kl_estimate",
    "kto_loss",
    "masked_mean",
    "orpo_loss",
    "ppo_policy_loss",
    "reward_loss",
    "sequence_logps",
    "simpo_loss",
    "token_logps",
    "value_loss",
]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log π(label) with the causal shift, and the mask of scored tokens.

    ``logits`` are the model's raw output, *not* shifted: position t predicts token t + 1. ``labels``
    are the input ids with IGNORE_INDEX on the prompt and padding. So logits[:, :-1] score
    labels[:, 1:], exactly as TRL's fused LM head and ``get_batch_logps`` do.

    Args:
        logits: (B, T, V).
        labels: (B, T).

    Returns:
        (logps, mask): both (B, T − 1); logps is 0 where mask is False.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    shifted_logits = logits[:, :-1].float()  # (B, T-1, V)
    shifted_labels = labels[:, 1:]  # (B, T-1)
    mask = shifted_labels != IGNORE_INDEX
    log_probs = F.log_softmax(shifted_logits, dim=-1)
    logps = log_probs.gather(-1, shifted_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return logps * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log π(y | x) per sequence: the sum (or, ``average=True``, the mean) of the scored tokens' log-probs.

    The sum is what TRL's DPOTrainer / KTOTrainer call ``chosen_logps``; the mean is what ORPO, SimPO
    and TRL 1.16's IPO use. Shift convention as ``token_logps``. A sequence with no scored token
    averages to 0.

    Args:
        logits: (B, T, V), unshifted.
        labels: (B, T).

    Returns:
        (B,).
    """
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)  # (B,)
    return total / mask.sum(-1).clamp_min(1) if average else total


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization and its classic variants (TRL's ``loss_type`` names).

        Δ = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
        sigmoid (DPO, Rafailov et al. 2023, arXiv:2305.18290; cDPO smoothing ε):
                 −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)
        ipo     (Azar et al. 2023, arXiv:2310.12036, Eq. 17):   (Δ − 1/(2β))²
        hinge   (SLiC, Zhao et al. 2023, arXiv:2305.10425):      max(0, 1 − βΔ)
        robust  (rDPO, Chowdhury et al. 2024, arXiv:2403.00409):
                 [−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)
        rewards: r_w = β (log π(y_w|x) − log π_ref(y_w|x)), r_l likewise (detached)

    With π = π_ref, Δ = 0: the sigmoid loss is log 2 and both rewards are 0.

    IPO in TRL 1.16 divides each log-ratio by its completion's token count; pass length-averaged
    log-probs (``sequence_logps(..., average=True)``) to get that, summed ones for the paper's form.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) log π of the chosen / rejected completions.
        reference_chosen_logps, reference_rejected_logps: (B,) the same under the reference.
        beta: β, the strength of the implicit KL to the reference (IPO's τ).
        loss_type: one of ``DPO_LOSS_TYPES``.
        label_smoothing: ε, the assumed probability that a pair's labels are flipped (sigmoid, robust).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "robust":
        if not label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs label_smoothing < 0.5, got {label_smoothing}")
        losses = (
            -(1 - label_smoothing) * F.logsigmoid(beta * delta)
            + label_smoothing * F.logsigmoid(-beta * delta)
        ) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The NLL of the chosen completions, averaged over their tokens in the batch (a scalar):

        L_NLL = − Σ_b log π(y_w,b | x_b) / Σ_b |y_w,b|

    RPO (Pang et al. 2024, arXiv:2404.19733) adds α · L_NLL to the DPO loss so that the chosen answers'
    likelihood does not fall along with the rejected ones' (DPO's margin can grow while both drop). TRL
    1.16 writes it as ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, α]``; its ``sft`` term is this
    token mean (not a mean of per-sequence means).

    Args:
        chosen_logps: (B,) summed log-probs of the chosen completions.
        chosen_tokens: (B,) their numbers of scored tokens.
    """
    return -chosen_logps.float().sum() / chosen_tokens.sum().clamp_min(1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, arXiv:2403.07691, Eqs. 4–7); reference-free.

        odds(y|x) = P / (1 − P),   P = exp(mean-token log π(y|x))
        L_OR = −β log σ( log odds(y_w|x) − log odds(y_l|x) )
        rewards: β · log π(y|x) (detached)

    The full ORPO objective is L_SFT(y_w) + L_OR; add the chosen NLL yourself. TRL's
    ``ORPOTrainer.odds_ratio_loss`` returns β log σ(·) (a quantity to *maximise*, subtracted from the
    NLL); this returns its negative, the quantity to minimise.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) *length-averaged* log-probs (< 0).
        beta: λ of the paper, the weight of the odds-ratio term.
    """
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))  # (B,)
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6); reference-free, with a target margin γ.

        L = −log σ( β · mean-token log π(y_w|x) − β · mean-token log π(y_l|x) − γ )
        rewards: β · mean-token log π(y|x) (detached)

    ``label_smoothing`` ε mixes in the flipped pair as cDPO does (TRL's CPOTrainer ``loss_type="simpo"``).
    γ is absolute, as in the paper's equation (TRL's ``simpo_gamma``, which it divides by β before
    scaling by β again). Defaults: β = 2.0 (the paper's common setting), γ = 0.5 (TRL's default).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) *length-averaged* log-probs.
        beta: β, the reward scale.
        gamma: γ, the target reward margin (absolute, as in the paper's equation).
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def kto_kl_estimate(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀: the batch estimate of KL(π ‖ π_ref), detached and clamped at 0.

    Computed, as in the paper and TRL, on *mismatched* pairs (each prompt with another example's
    completion): z₀ = max(0, mean(log π(y'|x) − log π_ref(y'|x))).
    """
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp_min(0)


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_estimate: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman–Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7).

        r(x, y) = log π(y|x) − log π_ref(y|x)
        desirable:    λ_D (1 − σ(β (r − z₀)))
        undesirable:  λ_U (1 − σ(β (z₀ − r)))
        rewards: β r (detached)

    The batch loss is ``losses.mean()`` (TRL concatenates the two groups and takes ``nanmean``; the
    mean does not depend on the order). ``z₀`` comes from ``kto_kl_estimate``.

    Args:
        policy_logps, reference_logps: (B,) summed completion log-probs.
        desirable: (B,) bool, True for desirable ("chosen") examples.
        kl_estimate: z₀, a scalar (tensor or float), treated as a constant.
        beta: β.
        desirable_weight, undesirable_weight: λ_D, λ_U (balance unequal group sizes).

    Returns:
        (losses, rewards), each (B,) in the input order.
    """
    logratios = policy_logps - reference_logps  # (B,)
    kl = torch.as_tensor(kl_estimate, dtype=logratios.dtype, device=logratios.device).detach()
    desirable = desirable.bool()
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach()


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Bradley–Terry pairwise loss for a scalar reward model (Ouyang et al. 2022; TRL's RewardTrainer).

        L = mean( −log σ(r_c − r_r − m) ) + η · mean( (r_c + r_r)² )

    The margin m (Llama 2's per-pair margin) is optional; the centring term (Eisenstein et al. 2023,
    arXiv:2312.09244), with coefficient η, keeps rewards near zero-mean.

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards.
        margin: (B,) or None.
        center_rewards_coefficient: η, or None for no centring.

    Returns:
        the scalar batch loss.
    """
    difference = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    return loss
