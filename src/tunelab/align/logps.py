"""Sequence log-probabilities of completions, and the preference evaluation built on them.

    log π(y | x) = Σ_{t ∈ completion} log π(y_t | x, y_<t)        (summed: DPO, KTO)
    mean-token   = log π(y | x) / |y|                              (IPO in TRL 1.16, ORPO, SimPO)

:func:`pair_logps` runs chosen and rejected in *one* forward of 2B rows (TRL's ``concatenated_forward``)
and returns a (B, 4) table ``[chosen_sum, rejected_sum, chosen_mean, rejected_mean]``, one row per pair,
so that a precomputed reference can cache it per record. :func:`evaluate_preferences` scores a policy
on held-out pairs: how often it prefers the chosen answer (by log-probability and, with a reference,
by implicit reward), for prompts with a known answer how often greedy decoding produces it, and with a
reference the held-out KL(π ‖ π_ref) on the policy's own samples (``kl_ref``, :mod:`tunelab.align.kl`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tunelab.align.losses import token_logps
from tunelab.data.collate import IGNORE_INDEX, pad_right

CHOSEN_SUM, REJECTED_SUM, CHOSEN_MEAN, REJECTED_MEAN = range(4)


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits aligned with ``input_ids`` (prompt-tuning methods prepend virtual tokens: cut them)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, -input_ids.shape[1] :]


def completion_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    """(B, 2): ``[summed, mean-token]`` log-prob of each row's scored (label != -100) tokens."""
    logits = lm_logits(model, input_ids, attention_mask)
    logps, mask = token_logps(logits, labels)  # one log-softmax over the vocabulary for both figures
    total = logps.sum(-1)
    return torch.stack([total, total / mask.sum(-1).clamp_min(1)], dim=-1)


def concatenate_pairs(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``chosen_*`` and ``rejected_*`` stacked into (2B, T) input_ids, attention_mask, labels."""
    return tuple(torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in  # type: ignore[return-value]
                 ("input_ids", "attention_mask", "labels"))


def pair_logps(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(B, 4) ``[chosen_sum, rejected_sum, chosen_mean, rejected_mean]`` from one forward of 2B rows."""
    values = completion_logps(model, *concatenate_pairs(batch))  # (2B, 2)
    chosen, rejected = values.chunk(2)  # (B, 2) each
    return torch.stack([chosen[:, 0], rejected[:, 0], chosen[:, 1], rejected[:, 1]], dim=-1)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_preferences(model: nn.Module, tokenizer: Any, records: Sequence[dict], collate: Any, *,
                         reference: Any = None, template: str = "plain", generate: bool = True,
                         max_new_tokens: int = 32, batch_size: int = 16, progress: bool = False,
                         kl: bool = False) -> dict[str, float]:
    """Held-out preference metrics of ``model`` on preference records.

    Returns:
        ``preference_accuracy``: share of pairs with log π(chosen) > log π(rejected) (summed log-probs);
        ``reward_accuracy`` / ``reward_margin`` (with a reference): share with implicit reward
        r_c > r_r, and the mean of r_c − r_r (β = 1); ``generation_exact_match`` and
        ``generation_rejected_rate`` (``generate``): greedy output equal to the chosen / the rejected
        answer (exact match after normalisation) — meaningful where chosen is *the* answer (the
        built-in world); ``kl_ref`` (``kl`` and a reference): the mean over the held-out prompts of
        Σ_t KL(π ‖ π_ref) along one completion sampled from the policy (:mod:`tunelab.align.kl`);
        ``score`` = preference_accuracy.
    """
    from tunelab.align.kl import heldout_kl
    from tunelab.eval import generate as generation
    from tunelab.eval import metrics
    from tunelab.eval.tasks import first_line, render

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins, reward_wins, margins = [], [], []
    try:
        for start in range(0, len(records), batch_size):
            batch = _to(collate(list(records[start : start + batch_size])), device)
            policy = pair_logps(model, batch)  # (B, 4)
            wins += (policy[:, CHOSEN_SUM] > policy[:, REJECTED_SUM]).tolist()
            if reference is not None and reference.mode != "none":
                ref = reference.logps(model, batch, pair_logps)
                margin = (policy[:, CHOSEN_SUM] - ref[:, CHOSEN_SUM]) - (policy[:, REJECTED_SUM] - ref[:, REJECTED_SUM])
                reward_wins += (margin > 0).tolist()
                margins += margin.tolist()
        result = {"preference_accuracy": sum(wins) / len(wins)}
        if reward_wins:
            result["reward_accuracy"] = sum(reward_wins) / len(reward_wins)
            result["reward_margin"] = sum(margins) / len(margins)
        prompts = [render(r, template, tokenizer) for r in records]
        if kl and reference is not None and reference.mode != "none":
            result.update(heldout_kl(model, tokenizer, prompts, reference, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size))
        if generate:
            outputs = [first_line(text) for text in generation.greedy(
                model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)]
            result["generation_exact_match"] = metrics.exact_match(outputs, [r["chosen"] for r in records])
            result["generation_rejected_rate"] = metrics.exact_match(outputs, [r["rejected"] for r in records])
    finally:
        model.train(was_training)
    result["score"] = result["preference_accuracy"]
    return result


def right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask of right-padded token lists."""
    ids = pad_right(rows, pad)
    mask = pad_right([[1] * len(r) for r in rows], 0, ids.shape[1])
    return ids, mask


__all__ = ["IGNORE_INDEX", "completion_logps", "concatenate_pairs", "evaluate_preferences", "lm_logits",
           "pair_logps", "right_pad"]
