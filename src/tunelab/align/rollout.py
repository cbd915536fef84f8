"""Rollouts for online RL (PPO, GRPO): sample completions from the policy, score them, per-token log-probs.

A rollout of N = prompts × G completions is three tensors over the left-padded prompt followed by
the generated tokens (``tunelab.eval.generate`` explains the left padding and ``position_ids``)::

    sequences       (N, P + S)   prompt (left-padded to P) + S generated tokens
    attention_mask  (N, P + S)   1 on real prompt tokens and on completion tokens up to the first EOS
    completion_mask (N, S)       1 on completion tokens up to and including the first EOS

``token_logps`` gives log π(y_t | x, y_<t) for every completion token (N, S) — logits at positions
P − 1 … P + S − 2 score tokens P … P + S − 1 — and optionally the last hidden states at the same
positions (PPO's value head reads them). The log-probs are those of the distribution the tokens were
sampled from, softmax(logits / T) at the rollout's temperature T (as TRL's GRPO and PPO trainers
compute them), so the importance ratio π/π_old and the KL to the reference compare like with like;
a greedy rollout (T = 0) is scored at T = 1. Sampling uses the KV cache, temperature scaling and the
global torch generator (seeded by the loop), so runs are reproducible.

Rewards: :func:`exact_match_rewards` is the programmatic ground-truth reward of the built-in world
(1 when the first line of the completion equals the known answer after SQuAD normalisation, else 0);
:func:`in_context_rewards` says whether the answer is a span of the record's context (the extractive
constraint, a reward-shaping term that needs no answer key);
:class:`tunelab.align.reward.RewardModel` scores with a trained reward model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.eval.generate import _cache_kwarg, _left_pad, encode_prompt
from tunelab.eval.metrics import exact_match, normalize_answer, token_f1
from tunelab.eval.tasks import first_line


@dataclass
class Rollout:
    sequences: torch.Tensor  # (N, P + S)
    attention_mask: torch.Tensor  # (N, P + S)
    completion_mask: torch.Tensor  # (N, S)
    texts: list[str]  # decoded completions (up to EOS)
    prompt_length: int  # P
    temperature: float = 1.0  # the sampling temperature: token_logps scores at it (0, greedy: scored at 1)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, P + S): real tokens count 0, 1, ...


@torch.no_grad()
def sample(model: nn.Module, tokenizer, prompts: Sequence[str], *, num_generations: int = 1,
           max_new_tokens: int = 32, temperature: float = 1.0) -> Rollout:
    """``num_generations`` completions per prompt (consecutive rows), sampled at ``temperature``
    (0 = greedy). The model is put in eval mode for sampling and restored afterwards."""
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p) for p in prompts for _ in range(num_generations)]
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    eos = tokenizer.eos_token_id
    input_ids, attention_mask = _left_pad(encoded, pad, device)  # (N, P)
    prompt_mask, prompt_length = attention_mask, input_ids.shape[1]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    finished = torch.zeros(len(encoded), dtype=torch.bool, device=device)  # (N,)
    cache_name, cache, step_ids, generated = _cache_kwarg(), None, input_ids, []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=True, **{cache_name: cache})
            cache, logits = out[cache_name], out.logits[:, -1].float()  # (N, V)
            if temperature > 0:
                next_ids = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(-1)
            else:
                next_ids = logits.argmax(dim=-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
            generated.append(next_ids)
            finished |= next_ids == eos if eos is not None else torch.zeros_like(finished)
            if bool(finished.all()):
                break
            step_ids = next_ids[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(encoded), 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
    finally:
        model.train(was_training)
    completion = torch.stack(generated, dim=1) if generated else input_ids.new_zeros(len(encoded), 0)  # (N, S)
    is_eos = completion == eos if eos is not None else torch.zeros_like(completion, dtype=torch.bool)
    # keep tokens up to and including the first EOS: positions where no EOS came *before*
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    completion_mask = (before == 0).long()  # (N, S)
    texts = [tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True).strip()
             for row, mask in zip(completion, completion_mask, strict=True)]
    return Rollout(torch.cat([input_ids, completion], dim=1), torch.cat([prompt_mask, completion_mask], dim=1),
                   completion_mask, texts, prompt_length, temperature)


def token_logps(model: nn.Module, rollout: Rollout, hidden: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, S) log-probs of the completion tokens under ``model`` at the rollout's temperature,
    log softmax(logits / T) (and (N, S, H) last hidden states)."""
    out = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                position_ids=rollout.position_ids, output_hidden_states=hidden)
    start, length = rollout.prompt_length - 1, rollout.completion_mask.shape[1]
    logits = out.logits[:, -rollout.sequences.shape[1]:][:, start : start + length].float()  # (N, S, V)
    if rollout.temperature > 0 and rollout.temperature != 1.0:
        logits = logits / rollout.temperature
    targets = rollout.sequences[:, rollout.prompt_length :]  # (N, S)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    states = out.hidden_states[-1][:, -rollout.sequences.shape[1]:][:, start : start + length] if hidden else None
    return logps * rollout.completion_mask, states


def exact_match_rewards(texts: Sequence[str], answers: Sequence[str | None]) -> torch.Tensor:
    """(N,) 1.0 where the completion's first line equals the known answer (SQuAD-normalised), else 0."""
    return torch.tensor([exact_match([first_line(t)], [a]) if a is not None else 0.0
                         for t, a in zip(texts, answers, strict=True)])


def token_f1_rewards(texts: Sequence[str], answers: Sequence[str | None]) -> torch.Tensor:
    """(N,) SQuAD token F1 of the completion's first line against the known answer, in [0, 1]: a dense
    version of :func:`exact_match_rewards` (partial credit for a partly right answer), so that a group of
    completions that all miss the exact answer still gets different rewards (GRPO's advantages are 0
    when every completion of a prompt scores the same)."""
    return torch.tensor([token_f1([first_line(t)], [a]) if a is not None else 0.0
                         for t, a in zip(texts, answers, strict=True)])


def in_context_rewards(texts: Sequence[str], contexts: Sequence[str | None]) -> torch.Tensor:
    """(N,) 1.0 where the completion's first line, SQuAD-normalised, is a non-empty run of whole words of
    the normalised context, else 0 (also when the record has no context). Extractive QA's answer is
    always such a span, so this rewards copying from the context over inventing a value — a shaping
    term that does not need the answer key (``context_bonus`` of ``grpo`` / ``ppo``)."""
    def inside(text: str, context: str | None) -> float:
        answer = normalize_answer(first_line(text))
        return float(bool(answer) and context is not None and f" {answer} " in f" {normalize_answer(context)} ")

    return torch.tensor([inside(t, c) for t, c in zip(texts, contexts, strict=True)])
