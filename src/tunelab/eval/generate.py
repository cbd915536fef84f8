"""Batched greedy decoding with a KV cache, identical per prompt whatever it is batched with.

Greedy decoding picks ``y_t = argmax_v p(v | x, y_<t)`` until EOS or ``max_new_tokens``. Done naively,
every step re-runs the model on the whole sequence (O(T^2) work per token). With a KV cache the prompt
is run once ("prefill") and every later step feeds only the newest token, attending to the cached keys
and values of all earlier positions (``past_key_values``).

Batching prompts of different lengths needs padding. We pad on the *left* so that every row's last
position is its newest token::

    row 0:  <pad> <pad>  p0   p1   p2  | g0  g1 ...      attention_mask 0 0 1 1 1 | 1 1
    row 1:   q0    q1    q2   q3   q4  | h0  h1 ...      attention_mask 1 1 1 1 1 | 1 1
    positions (cumsum(mask) - 1):  0 0 0 1 2 | 3 4   and   0 1 2 3 4 | 5 6

Padding must be invisible to the real tokens: the attention mask hides pad keys, and ``position_ids``
count only real tokens, so row 0 sees exactly the positions (and so the rotary / learned position
embeddings) it would see alone. The hand-written loop below does that explicitly rather than relying
on ``model.generate`` defaults, and works for any Hugging Face causal LM (or wrapper of one) whose
forward accepts ``attention_mask``, ``position_ids``, ``past_key_values`` and ``use_cache``.

Prompts are sorted by length before batching (less padding, and the longest batch, the one most likely
to run out of memory, comes first); outputs are returned in the input order. The tokenizer is never
mutated: padding is done by hand, so its ``padding_side`` stays what it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunelab.errors import ConfigError, DataError, ModelError


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator:
    """A rich progress bar over ``total`` steps; yields ``advance(n=1)``. Silent when not enabled.

    Rich falls back to plain (non-animated) output when stdout is not a terminal; the bar is
    transient, so logs do not fill up with bars.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not enabled, transient=True) as bar:
        task_id = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task_id, n)


@lru_cache(maxsize=1)
def _cache_kwarg() -> str:
    """Name of the KV-cache argument/output: ``cache`` in recent transformers 5.x, else ``past_key_values``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _eos_ids(tokenizer, stop_token_ids: Sequence[int] | None) -> list[int]:
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    return ids + [int(i) for i in (stop_token_ids or [])]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids exactly as tunelab's training collators build them: BOS + the text's tokens.

    The text is tokenised without special tokens and BOS is put in front unless the text already
    starts with it (``tunelab.data.collate`` does the same), so a model sees at evaluation time the
    prefix it was trained on.
    """
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [int(bos)] + ids


def position_limit(model: torch.nn.Module) -> int | None:
    """The most positions the model can attend over (``max_position_embeddings``), if its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def truncate_left(ids: list[int], budget: int, bos: int | None) -> list[int]:
    """Keep the last ``budget`` tokens (the ones next to the answer), and BOS in front, as training does."""
    if len(ids) <= budget:
        return ids
    keep_bos = bos is not None and ids[:1] == [bos]
    return ([bos] if keep_bos else []) + ids[len(ids) - budget + int(keep_bos) :]


def _encode(tokenizer, prompts: Sequence[str], budget: int | None = None) -> list[list[int]]:
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    if budget is not None:
        encoded = [truncate_left(ids, max(budget, 1), tokenizer.bos_token_id) for ids in encoded]
    for i, ids in enumerate(encoded):
        if not ids:
            raise DataError(
                f"prompt {i} tokenises to no tokens; give it some text or set tokenizer.bos_token"
            )
    return encoded


def _left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), real tokens right-aligned."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_at_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:position]
    return tokens


@torch.no_grad()
def greedy_batch(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Greedy-decode one batch of token-id prompts with the KV cache; returns new ids up to EOS.

    Rows that produced an EOS keep running (their tokens are discarded) until every row has finished
    or ``max_new_tokens`` tokens were produced.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad(sequences, pad_id, device)  # (B, T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens 0..len-1
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(sequences), dtype=torch.bool, device=device)  # (B,)
    cache_name = _cache_kwarg()
    cache, step_ids, generated = None, input_ids, []
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_name: cache},
        )
        cache = out[cache_name]
        next_ids = out.logits[:, -1].argmax(dim=-1)  # (B,)
        generated.append(next_ids)
        finished |= torch.isin(next_ids, eos)
        if bool(finished.all()):
            break
        step_ids = next_ids[:, None]  # (B, 1): only the newest token goes through the model
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(sequences), 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1  # (B, 1)
    tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in sequences]  # (B, S)
    return [_cut_at_eos(row, eos_ids) for row in tokens]


def greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop_at_eos: bool = True,
    progress: bool = True,
    stop_token_ids: Sequence[int] | None = None,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (only the new text), batched, using the KV cache.

    Args:
        model: a Hugging Face causal LM (decoder-only), or a wrapper with the same forward.
        tokenizer: its tokenizer; prompts are encoded as BOS + tokens (:func:`encode_prompt`, as in
            training), ``eos_token_id`` ends a continuation, ``pad_token_id`` (else the EOS id) fills
            the left padding. It is not modified.
        prompts: the prompt strings, already rendered with any template.
        max_new_tokens: the most tokens generated per prompt.
        batch_size: prompts decoded together.
        stop_at_eos: cut each continuation at its first EOS (or ``stop_token_ids`` token) and stop a
            batch once every row has one; False always generates ``max_new_tokens`` tokens.
        progress: show a progress bar over batches (only when there is more than one batch).
        stop_token_ids: extra token ids that end a continuation like EOS (e.g. a chat end marker).
        max_prompt_tokens: cut longer prompts from the left (BOS kept), as the training collators do
            (pass ``data.max_length``). Prompts are always cut to the model's position limit minus
            ``max_new_tokens``, so that prompt and continuation fit the positions the model has.

    Returns:
        One string per prompt, in input order: the generated tokens decoded with
        ``skip_special_tokens=True`` and stripped. The result for a prompt does not depend on the
        other prompts in its batch, and equals the no-cache greedy loop on that prompt alone.
    """
    if batch_size < 1 or max_new_tokens < 0:
        raise ConfigError(
            f"greedy: batch_size={batch_size}, max_new_tokens={max_new_tokens}; use batch_size >= 1 and max_new_tokens >= 0"
        )
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ModelError(
            "greedy decoding supports decoder-only causal LMs; load the model with task='causal_lm'"
        )
    if not prompts or max_new_tokens == 0:
        return ["" for _ in prompts]
    budget = max_prompt_tokens
    limit = position_limit(model)
    if limit is not None:
        budget = min(budget or limit, limit - max_new_tokens)
    encoded = _encode(tokenizer, prompts, budget)
    eos_ids = _eos_ids(tokenizer, stop_token_ids) if stop_at_eos else []
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # stable: ties keep input order
    outputs: list[str] = [""] * len(prompts)
    n_batches = -(-len(prompts) // batch_size)
    was_training = model.training
    model.eval()
    try:
        with progress_bar(n_batches, "generating", enabled=progress and n_batches > 1) as advance:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                new_ids = greedy_batch(model, [encoded[i] for i in rows], max_new_tokens, pad_id, eos_ids)
                for i, ids in zip(rows, new_ids, strict=True):
                    outputs[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                advance()
    finally:
        model.train(was_training)
    return outputs
