"""Understanding objectives on a model with a task head: sequence and token classification.

Sequence classification (``classification``): cross-entropy of the head's logits over the classes,

    L = - (1 / B) Σ_b log softmax(W h_b)[y_b]

with ``h_b`` the pooled representation the ``*ForSequenceClassification`` model computes (the last
non-pad token for decoders, ``[CLS]`` for encoders); scored by accuracy.

Token classification (``token_classification``, NER with BIO tags): the same loss per word, on the
first sub-token of each word (later sub-tokens and special tokens carry label -100); scored by
strict IOB2 entity F1 (seqeval).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from tunelab.train.objective import BaseObjective, ObjectiveConfig


class ClassificationOptions(ObjectiveConfig):
    """Options of the classification objectives (none yet)."""


class ClassificationObjective(BaseObjective):
    """``classification``: one label per record (field ``label``), accuracy."""

    config_class = ClassificationOptions
    model_task = "sequence_classification"
    label_key = "label"

    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 128, **_: Any) -> Callable:
        from tunelab.data.collate import ClassificationCollator

        return ClassificationCollator(tokenizer, labels, max_length=max_length)

    def evaluate(self, model: nn.Module, records: Sequence[Any], progress: bool = True, **_: Any) -> dict[str, float]:
        from tunelab.eval import tasks

        model.eval()
        return tasks.evaluate_classifier(model, records, self.collate_fn, progress=progress)


class TokenClassificationObjective(BaseObjective):
    """``token_classification``: one BIO tag per word (field ``ner_tags``), entity F1."""

    config_class = ClassificationOptions
    model_task = "token_classification"
    label_key = "ner_tags"

    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 128, **_: Any) -> Callable:
        from tunelab.data.collate import TokenClassificationCollator

        return TokenClassificationCollator(tokenizer, labels, max_length=max_length)

    def evaluate(self, model: nn.Module, records: Sequence[Any], progress: bool = True, **_: Any) -> dict[str, float]:
        from tunelab.eval import tasks

        model.eval()
        return tasks.evaluate_tagger(model, records, self.collate_fn, self.labels, progress=progress)
