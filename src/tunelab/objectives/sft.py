"""Supervised fine-tuning of a causal LM: next-token cross-entropy on the response tokens.

    L = - (1 / |R|) Σ_{t ∈ R} log p_θ(y_t | y_<t)

``R`` is the set of response positions: prompt tokens are masked out of the loss (labels = -100) by
:class:`~tunelab.data.collate.SFTCollator`, so the model learns to answer, not to repeat the prompt.
Evaluation decodes greedily and scores every task with its own metric
(:func:`tunelab.eval.tasks.evaluate_records`).

:class:`LMObjective` is the same loss with nothing masked: continued pretraining (DAPT / TAPT) on plain
text records ``{"text": ...}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field
from torch import nn

from tunelab import IGNORE_INDEX
from tunelab.train.objective import BaseObjective, ObjectiveConfig


class SFTOptions(ObjectiveConfig):
    """Options of the ``sft`` objective (none yet: the data section sets template and length)."""


class SFTObjective(BaseObjective):
    """``sft``: response-only next-token loss; generative evaluation with each task's metric."""

    config_class = SFTOptions
    model_task = "causal_lm"
    template = "plain"

    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 256,
                      template: str = "plain", **_: Any) -> Callable:
        from tunelab.data.collate import SFTCollator

        self.template, self.max_length = template, max_length
        return SFTCollator(tokenizer, max_length=max_length, template=template)

    def evaluate(self, model: nn.Module, records: Sequence[Any], max_new_tokens: int = 32,
                 batch_size: int = 32, progress: bool = True, **_: Any) -> dict[str, float]:
        from tunelab.eval import tasks

        model.eval()
        return tasks.evaluate_records(model, self.tokenizer, records, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size, template=self.template, progress=progress,
                                      max_prompt_tokens=getattr(self, "max_length", None))


class LMOptions(ObjectiveConfig):
    """Options of the ``lm`` objective."""

    text_field: str = Field("text", description="Record field holding the text to model.")


class LMObjective(SFTObjective):
    """``lm``: plain causal language modelling over every token (continued pretraining)."""

    config_class = LMOptions

    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 256,
                      template: str = "plain", **_: Any) -> Callable:
        self.template = template
        return _TextCollator(tokenizer, max_length, self.config.text_field)

    def evaluate(self, model: nn.Module, records: Sequence[Any], batch_size: int = 32, **_: Any) -> dict[str, float]:
        """Held-out perplexity over the records' text (token-weighted), and ``score = -log ppl``."""
        import math

        import torch

        collate = self.collate_fn
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                batch = collate(list(records[start : start + batch_size]))
                batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
                tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += float(model(**batch).loss) * tokens
                count += tokens
        perplexity = math.exp(total / max(count, 1))
        return {"perplexity": perplexity, "score": -math.log(perplexity)}


class _TextCollator:
    """``{"text": ...}`` records -> input_ids / attention_mask / labels (every real token counts)."""

    def __init__(self, tokenizer: Any, max_length: int, field: str) -> None:
        from tunelab.data.collate import SegmentEncoder, pad_token_id

        self.encoder = SegmentEncoder(tokenizer, max_length, add_eos=True, mask_prompt=False)
        self.pad, self.field = pad_token_id(tokenizer), field

    def __call__(self, records: list[dict]) -> dict:
        from tunelab.data.collate import pad_right
        from tunelab.errors import DataError

        ids = []
        for record in records:
            if self.field not in record:
                raise DataError(f"objective lm needs a {self.field!r} field; a record has keys {sorted(record)}")
            ids.append(self.encoder([(str(record[self.field]), True)])[0])
        input_ids = pad_right(ids, self.pad)  # (B, T)
        attention_mask = pad_right([[1] * len(seq) for seq in ids], 0, input_ids.shape[1])  # (B, T)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)}
