"""Held-out KL of the policy to its reference: the x axis of the reward-vs-KL frontier.

Every KL-regularised alignment objective trades reward against staying close to π_ref. To put DPO
(β), KTO and PPO / GRPO (their KL coefficients) on one axis, each objective's ``evaluate`` reports the
same number, ``kl_ref``, measured the same way on its held-out prompts:

    kl_ref = mean over held-out prompts x of   Σ_{t=1..|y|} KL( π(·|x, y_<t) ‖ π_ref(·|x, y_<t) ),
             y ~ π(·|x) sampled at temperature 1, one completion per prompt,
    KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v))    (exact, over the whole vocabulary), in nats.

Why this estimator. A KL must be taken under the policy's own distribution, so the completions are
the policy's samples, not the data's chosen answers (those give a divergence "on data", which a policy
that never says them can keep small). By the chain rule of KL,

    KL(π(·|x) ‖ π_ref(·|x)) = E_{y ~ π} [ Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) ],

so one sampled completion per prompt gives an *unbiased* estimate of the sequence-level KL, and the
mean over prompts estimates E_x KL(π(·|x) ‖ π_ref(·|x)). It is the Rao–Blackwellised form of the
plain Monte-Carlo (k1) estimate Σ_t [log π(y_t) − log π_ref(y_t)]: the same expectation, lower
variance (the token drawn at each step is averaged out exactly), and never negative. Completions
end at the first EOS (included) or after ``max_new_tokens`` tokens: the KL is that of the truncated
process, the same horizon for every objective evaluated with the same ``eval.max_new_tokens``.

Sampling draws from a forked random generator seeded with ``seed``: the figure is deterministic for
a model and data, and evaluating it leaves the training random state untouched. The policy and the
reference both run in eval mode (no dropout) without gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tunelab.align.reference import Reference, eval_mode
from tunelab.align.rollout import Rollout, sample

KL_METRIC = "kl_ref"


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) Σ over the masked positions of the exact per-token KL(π ‖ π_ref) = Σ_v p (log p − log q).

    Args:
        policy_logits, reference_logits: (N, S, V) logits of π and π_ref at the same positions.
        mask: (N, S), nonzero on the positions that count (the completion up to its EOS).
    """
    log_p = torch.log_softmax(policy_logits.float(), dim=-1)
    log_q = torch.log_softmax(reference_logits.float(), dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N, S)
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    return per_token.sum(-1)


def completion_logits(model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """(N, S, V) logits that predict each completion token (position P − 1 + t predicts token P + t)."""
    out = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                position_ids=rollout.position_ids)
    start, length = rollout.prompt_length - 1, rollout.completion_mask.shape[1]
    # prompt-tuning methods prepend virtual tokens: keep the positions of the real sequence
    return out.logits[:, -rollout.sequences.shape[1]:][:, start : start + length].float()


@torch.no_grad()
def sequence_kl(model: nn.Module, tokenizer: Any, prompts: Sequence[str], reference: Reference, *,
                max_new_tokens: int = 32, batch_size: int = 16, seed: int = 0) -> torch.Tensor:
    """(len(prompts),) per-prompt Σ_t KL(π ‖ π_ref) along one completion sampled from π at temperature 1."""
    device = next(model.parameters()).device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    values = []
    with torch.random.fork_rng(devices=devices), eval_mode(model):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            rollout = sample(model, tokenizer, list(prompts[start : start + batch_size]), num_generations=1,
                             max_new_tokens=max_new_tokens, temperature=1.0)
            if rollout.completion_mask.shape[1] == 0:
                values.append(torch.zeros(len(rollout.texts)))
                continue
            with reference.active(model):
                reference_logits = completion_logits(model, rollout)
            policy_logits = completion_logits(model, rollout)
            values.append(token_kl(policy_logits, reference_logits, rollout.completion_mask).cpu())
    return torch.cat(values) if values else torch.zeros(0)


def heldout_kl(model: nn.Module, tokenizer: Any, prompts: Sequence[str], reference: Reference, *,
               max_new_tokens: int = 32, batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """``{"kl_ref": mean over prompts of the sequence KL}`` (see the module docstring); {} without prompts."""
    if not prompts:
        return {}
    values = sequence_kl(model, tokenizer, prompts, reference, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, seed=seed)
    return {KL_METRIC: float(values.mean())}


__all__ = ["KL_METRIC", "completion_logits", "heldout_kl", "sequence_kl", "token_kl"]
