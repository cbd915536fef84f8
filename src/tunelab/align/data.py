"""Alignment data: preference pairs, unpaired KTO examples and prompts for online RL, as batches.

Records (see ``docs/internals.md``):

- **preference** ``{"prompt", "chosen", "rejected"}`` (optionally ``messages``, ``system``): the
  built-in world's ``preference`` task (chosen = the correct answer, rejected = a plausible wrong
  one, so the ground truth is known), HH-RLHF and ShareGPT-DPO files through
  :func:`tunelab.data.formats.load_records`, or any JSONL/CSV with a column mapping;
- **unpaired** (KTO) ``{"prompt", "completion", "label": bool}`` (a JSONL/CSV file with those columns
  loads as such; the label may also be 1/0 or "true"/"false"/"desirable"/"undesirable"); a preference
  record counts as two unpaired ones (chosen desirable, rejected undesirable);
- **prompt** (PPO / GRPO) any record with a prompt; the reference answer for the programmatic
  reward is ``answer``, else ``chosen``, else ``response``.

Every batch renders the conversation with the data section's ``template`` (``plain``, ``chatml``,
``auto`` = the tokenizer's chat template) and masks the prompt tokens (labels = -100), through the
shared :class:`~tunelab.data.collate.SegmentEncoder`. Batches carry ``record_keys`` (a list of str) so
that a precomputed reference can look its log-probs up per record.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data.collate import SegmentEncoder, _batch, pad_right, pad_token_id
from tunelab.data.formats.mapped import desirable_label
from tunelab.data.templates import record_segments, render_prompt
from tunelab.errors import DataError
from tunelab.eval.generate import encode_prompt


def record_key(record: dict, side: str = "") -> str:
    """A stable key of a record (its ``id``, else its text) for per-record caches."""
    base = str(record.get("id") or hash((record.get("prompt"), record.get("chosen"), record.get("completion"))))
    return f"{base}/{side}" if side else base


def reference_answer(record: dict) -> str:
    """The known-correct answer of a record: ``answer``, ``chosen`` or ``response``."""
    for key in ("answer", "chosen", "response"):
        if isinstance(record.get(key), str):
            return record[key]
    raise DataError(f"record {record.get('id', '?')!r} has no answer/chosen/response for the programmatic reward; "
                    "use reward: model with a trained reward model")


def unpaired(records: list[dict]) -> list[dict]:
    """KTO examples: unpaired records as they are, preference pairs split into two (desirable first)."""
    out = []
    for record in records:
        if "chosen" in record and "rejected" in record:
            out.append({**record, "completion": record["chosen"], "label": True, "side": "chosen"})
            out.append({**record, "completion": record["rejected"], "label": False, "side": "rejected"})
        elif "label" in record and isinstance(record.get("completion", record.get("response")), str):
            completion = record.get("completion", record.get("response"))
            try:
                label = desirable_label(record["label"])
            except ValueError as error:
                raise DataError(f"record {record.get('id', '?')!r}: {error}") from None
            out.append({**record, "completion": completion, "label": label, "side": ""})
        else:
            raise DataError(f"record {record.get('id', '?')!r} is neither a preference pair (prompt/chosen/rejected) "
                            "nor an unpaired example (prompt/completion/label)")
    return out


class _Encoder:
    """``(record, completion) -> (input_ids, labels)``: templated prompt masked, completion + EOS scored."""

    def __init__(self, tokenizer: Any, max_length: int, template: str) -> None:
        self.tokenizer, self.template = tokenizer, template
        self.encoder = SegmentEncoder(tokenizer, max_length, add_eos=True, mask_prompt=True)
        self.pad = pad_token_id(tokenizer)

    def __call__(self, record: dict, completion: str) -> tuple[list[int], list[int]]:
        if not isinstance(completion, str):
            raise DataError(f"record {record.get('id', '?')!r}: the completion to score is not a string")
        segments = record_segments(record, self.template, self.tokenizer, response=completion)
        last = max((i for i, (_, trainable) in enumerate(segments) if trainable), default=len(segments))
        # only the final response is scored; earlier assistant turns of a multi-turn prompt are context
        return self.encoder([(text, trainable and i == last) for i, (text, trainable) in enumerate(segments)])


class PairCollator:
    """Preference pairs -> ``chosen_*`` / ``rejected_*`` (B, T) tensors padded to one length + record keys.

    Concatenating the two halves along the batch gives one forward of 2B rows (TRL's
    ``concatenated_forward``).
    """

    def __init__(self, tokenizer: Any, max_length: int = 256, template: str = "plain") -> None:
        self.encode = _Encoder(tokenizer, max_length, template)

    def __call__(self, records: list[dict]) -> dict[str, Any]:
        for record in records:
            if not all(isinstance(record.get(k), str) for k in ("prompt", "chosen", "rejected")) and not (
                record.get("messages") and isinstance(record.get("chosen"), str)
            ):
                raise DataError(f"record {record.get('id', '?')!r} is not a preference pair; the objective needs "
                                "prompt/chosen/rejected records (data.tasks: [preference] or an HH-RLHF / DPO file)")
        chosen = [self.encode(r, r["chosen"]) for r in records]
        rejected = [self.encode(r, r["rejected"]) for r in records]
        length = max(len(ids) for ids, _ in chosen + rejected)
        batch: dict[str, Any] = {}
        for side, pairs in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = zip(*pairs, strict=True)
            for key, tensor in _batch(list(ids), list(labels), self.encode.pad, length).items():
                batch[f"{side}_{key}"] = tensor  # (B, T)
        # the 2B rows as one batch, what the objectives forward (token counts, latency probes)
        batch["input_ids"] = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        batch["attention_mask"] = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        batch["record_keys"] = [record_key(r) for r in records]
        return batch


class UnpairedCollator:
    """KTO batches: each completion after its prompt, and a *mismatched* completion for the KL estimate.

    ``kl_*`` pairs prompt i with the completion of row i - 1 (rows rolled by one, as TRL does), so the
    KL reference point is estimated on completions the policy did not condition on.
    """

    def __init__(self, tokenizer: Any, max_length: int = 256, template: str = "plain") -> None:
        self.encode = _Encoder(tokenizer, max_length, template)

    def __call__(self, records: list[dict]) -> dict[str, Any]:
        examples = unpaired(records)
        matched = [self.encode(r, r["completion"]) for r in examples]
        shifted = [examples[i - 1]["completion"] for i in range(len(examples))]
        mismatched = [self.encode(r, completion) for r, completion in zip(examples, shifted, strict=True)]
        batch: dict[str, Any] = {}
        for prefix, pairs in (("", matched), ("kl_", mismatched)):
            ids, labels = zip(*pairs, strict=True)
            for key, tensor in _batch(list(ids), list(labels), self.encode.pad).items():
                batch[f"{prefix}{key}"] = tensor  # (B', T)
        batch["desirable"] = torch.tensor([r["label"] for r in examples], dtype=torch.bool)  # (B',)
        # a row's log-probs depend on its completion *and* its KL partner: both are in the key
        batch["record_keys"] = [f"{record_key(r, r['side'] or str(r['label']))}|kl:{hash(partner)}"
                                for r, partner in zip(examples, shifted, strict=True)]
        return batch


class PromptCollator:
    """Online RL batches: rendered prompt strings and their reference answers (no tensors; the
    objective tokenises and generates)."""

    def __init__(self, tokenizer: Any, max_length: int = 256, template: str = "plain") -> None:
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length

    def __call__(self, records: list[dict]) -> dict[str, Any]:
        prompts = [render_prompt(r, self.template, self.tokenizer) for r in records]
        ids = [encode_prompt(self.tokenizer, p)[-self.max_length :] for p in prompts]
        return {
            "prompts": prompts,
            "answers": [_answer_or_none(r) for r in records],
            "contexts": [r.get("context") if isinstance(r.get("context"), str) else None for r in records],
            "record_keys": [record_key(r) for r in records],
            # the prompts as tokens (right-padded): token counts and latency probes; rollouts re-encode
            "input_ids": pad_right(ids, pad_token_id(self.tokenizer)),
            "attention_mask": pad_right([[1] * len(i) for i in ids], 0),
        }


def _answer_or_none(record: dict) -> str | None:
    try:
        return reference_answer(record)
    except DataError:
        return None
