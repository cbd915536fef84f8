"""PPO and GRPO maths as pure functions: advantages, clipped losses, KL penalty and its controller.

Per-token tensors are (B, T) over the *generated* tokens, with a (B, T) ``mask`` that is nonzero on
real tokens (padding after the end of a response is 0). References:

- PPO: Schulman et al. 2017, arXiv:1707.06347; GAE: Schulman et al. 2016, arXiv:1506.02438.
- RLHF with a KL penalty and an adaptive coefficient: Ziegler et al. 2019, arXiv:1909.08593.
- GRPO: Shao et al. 2024 (DeepSeekMath), arXiv:2402.03300.
- KL estimators k1 / k2 / k3: Schulman, "Approximating KL divergence" (2020).
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over the entries ``mask`` keeps (all of them when mask is None)."""
    if mask is None:
        return values.mean()
    keep = mask.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp_min(1.0)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation, backwards over the tokens of each response.

        δ_t = r_t + γ m_{t+1} V_{t+1} − V_t
        A_t = δ_t + γ λ m_{t+1} A_{t+1}          (A and V beyond the last token are 0)
        returns R_t = A_t + V_t

    m is the mask, so a response ends at its last real token (the episode ends there: no bootstrap).
    Defaults γ = 1, λ = 0.95 are TRL's PPO ones.

    Args:
        rewards: (B, T) per-token rewards (e.g. −β·KL per token plus the score on the last token).
        values: (B, T) value-head estimates V_t.
        mask: (B, T), nonzero on real tokens.

    Returns:
        (advantages, returns), each (B, T), detached and zero where masked; not whitened.
    """
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(length)):
        next_mask = mask[:, t + 1] if t + 1 < length else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * next_mask if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_mask * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages.detach(), ((advantages + values) * mask).detach()


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = 0.2,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective, as a loss.

        ρ_t = exp(log π(a_t) − log π_old(a_t))
        L = mean_t max( −A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε) )

    Args:
        logprobs: (B, T) under the current policy (with grad).
        old_logprobs: (B, T) under the policy that generated the rollouts.
        advantages: (B, T), or (B,) for one advantage per sequence (GRPO), broadcast over T.
        clip_range: ε.
        mask: (B, T).

    Returns:
        (loss, stats) with detached ``clip_fraction`` (share of tokens where the clipped branch
        is the larger) and ``approx_kl`` (k3 estimate of KL(π_old ‖ π), for early stopping).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1): one advantage per sequence
    log_ratio = logprobs - old_logprobs.detach()  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.exp(-log_ratio) - 1 + log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_range_value: float | None = 0.2,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO's clipped value loss.

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        L = ½ mean_t max( (V_t − R_t)², (V_clip,t − R_t)² )

    ``clip_range_value=None`` gives the plain ½ mean (V − R)².

    Args:
        values: (B, T) current value-head outputs (with grad).
        old_values: (B, T) values at rollout time.
        returns: (B, T) targets, e.g. from ``gae``.
        clip_range_value: ε_v, or None.
        mask: (B, T).
    """
    squared = (values - returns) ** 2
    if clip_range_value is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        squared = torch.maximum(squared, (clipped - returns) ** 2)
    return 0.5 * masked_mean(squared, mask)


class AdaptiveKLController:
    """Adaptive KL coefficient β of Ziegler et al. 2019 (Section 2.2), proportional control in log space.

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)

    ``target=None`` keeps β fixed. Defaults are TRL's classic PPO ones (β₀ = 0.2, target 6, horizon 10000).
    """

    def __init__(self, init_kl_coef: float = 0.2, target: float | None = 6.0, horizon: int = 10000):
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Feed the measured KL of the last ``n_steps`` samples; returns the new β."""
        if self.target is not None:
            error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", epsilon: float = 1e-4
) -> torch.Tensor:
    """GRPO's group-relative advantages: no value model, each completion against its siblings.

        A_i = (r_i − mean(r_group)) / (std(r_group) + ε)

    ``rewards`` hold ``group_size`` consecutive completions per prompt. std is the unbiased
    (Bessel-corrected) one and ε = 1e-4, as TRL 1.16's GRPOTrainer; ``scale_rewards="batch"`` divides
    by the whole batch's std, ``"none"`` only centres (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783).

    Args:
        rewards: (N,), N = prompts × group_size.
        group_size: completions per prompt (TRL's ``num_generations``), >= 2 for a group std.

    Returns:
        (N,) advantages.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (prompts, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # (N,)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    elif scale_rewards == "batch":
        std = rewards.float().std().expand_as(centred)
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return centred / (std + epsilon)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π (Schulman 2020).

        r = log π_ref(a) − log π(a)
        k1 = −r                       unbiased, can be negative per token (PPO's reward penalty)
        k2 = ½ r²                     biased, low variance
        k3 = eʳ − 1 − r               unbiased and >= 0 (GRPO's loss term, TRL's ``per_token_kl``)

    Args:
        logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens.
        kind: "k1", "k2" or "k3".

    Returns:
        (B, T) per-token estimates.
    """
    log_ratio = ref_logprobs - logprobs
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")
