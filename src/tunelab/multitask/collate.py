"""Batches of mixed tasks: each task's rows are encoded by its own collator, then padded together.

A multi-task batch is::

    input_ids, attention_mask (B, T) [, token_type_ids]    one padded tensor for every row
    tasks    list[str] (B,)                                  each row's task
    labels   {task: labels of its rows, in batch order}     (n_t, T) for generation / tokens (-100 padded),
                                                             (n_t,) for classes, (n_t, 2) for spans

which is what :class:`tunelab.models.heads.TaskHeads` takes for a task per row. A one-task batch is the
same with one key. :class:`SpanQACollator` encodes extractive QA (question + context) with the
answer's start / end token (inclusive) as labels; unanswerable questions (SQuAD v2) and answers cut by
truncation point at position 0, the "no answer" position.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tunelab import IGNORE_INDEX
from tunelab.data.collate import (
    ClassificationCollator,
    SFTCollator,
    TokenClassificationCollator,
    pad_right,
    pad_token_id,
)
from tunelab.errors import DataError
from tunelab.multitask.routing import chain_groups, contiguous_sizes
from tunelab.multitask.tasks import TaskSpec, task_of

PER_TOKEN = ("generation", "token_classification")


class SpanQACollator:
    """Extractive QA rows: ``{"question", "context", "answers": {"text": [...], "answer_start": [...]}}``.

    Encoders with ``[CLS] ... [SEP]`` get the pair ``(question, context)`` (context truncated);
    decoders get ``"Question: <q>\\nContext: <c>"`` (the question first, so every context token has
    seen it). Labels are ``(start, end)`` token positions, ``(0, 0)`` for no answer.
    """

    def __init__(self, tokenizer: Any, max_length: int = 256) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("extractive QA needs a fast tokenizer (offset mapping); load it with use_fast=True")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pair = tokenizer.cls_token is not None and tokenizer.sep_token is not None
        self.pad = pad_token_id(tokenizer)

    def encode(self, record: dict) -> dict[str, Any]:
        """``{"input_ids", "offsets", "context_mask", "label"}`` of one record (offsets into the context)."""
        question, context = record.get("question"), record.get("context")
        if not isinstance(question, str) or not isinstance(context, str):
            raise DataError(f"record {record.get('id', '?')!r} needs string 'question' and 'context' for extractive QA")
        if self.pair:
            enc = self.tokenizer(question, context, truncation="only_second", max_length=self.max_length,
                                 return_offsets_mapping=True)
            in_context = [s == 1 for s in enc.sequence_ids()]
            offsets = [tuple(o) for o in enc["offset_mapping"]]
        else:
            prefix = f"Question: {question}\nContext: "
            enc = self.tokenizer(prefix + context, truncation=True, max_length=self.max_length,
                                 return_offsets_mapping=True)
            shift = len(prefix)
            offsets = [(max(a - shift, 0), max(b - shift, 0)) for a, b in enc["offset_mapping"]]
            in_context = [a >= shift and b > a for a, b in enc["offset_mapping"]]
        start, end = 0, 0
        answers = record.get("answers") or {}
        texts, starts = list(answers.get("text") or []), list(answers.get("answer_start") or [])
        if texts and starts:
            char_start, char_end = int(starts[0]), int(starts[0]) + len(texts[0])
            tokens = [i for i, inside in enumerate(in_context)
                      if inside and offsets[i][1] > char_start and offsets[i][0] < char_end]
            if tokens and offsets[tokens[0]][0] <= char_start and offsets[tokens[-1]][1] >= char_end:
                start, end = tokens[0], tokens[-1]
        return {"input_ids": list(enc["input_ids"]), "offsets": offsets, "context_mask": in_context,
                "label": (start, end), "token_type_ids": enc.get("token_type_ids")}

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(record) for record in records]
        ids = [e["input_ids"] for e in encoded]
        length = max(map(len, ids))
        batch = {"input_ids": pad_right(ids, self.pad, length),  # (B, T)
                 "attention_mask": pad_right([[1] * len(s) for s in ids], 0, length),  # (B, T)
                 "labels": torch.tensor([e["label"] for e in encoded], dtype=torch.long)}  # (B, 2)
        if all(e["token_type_ids"] is not None for e in encoded):
            batch["token_type_ids"] = pad_right([e["token_type_ids"] for e in encoded], 0, length)
        return batch


def task_collator(task: TaskSpec, tokenizer: Any, max_length: int = 256, template: str = "plain") -> Callable:
    """The single-task collator of ``task``'s kind."""
    if task.kind == "generation":
        return SFTCollator(tokenizer, max_length=max_length, template=template)
    if task.kind == "classification":
        return ClassificationCollator(tokenizer, task.labels, max_length=max_length)
    if task.kind == "token_classification":
        return TokenClassificationCollator(tokenizer, task.labels, max_length=max_length)
    return SpanQACollator(tokenizer, max_length=max_length)


class MultitaskCollator:
    """``list[record] -> batch`` for any mix of tasks (see the module docstring)."""

    def __init__(self, tasks: Sequence[TaskSpec], tokenizer: Any, max_length: int = 256, template: str = "plain") -> None:
        self.tasks = list(tasks)
        self.collators = {t.name: task_collator(t, tokenizer, max_length, template) for t in self.tasks}
        self.kinds = {t.name: t.kind for t in self.tasks}
        self.pad = pad_token_id(tokenizer)

    def __call__(self, records: list[dict]) -> dict[str, Any]:
        names = [task_of(self.tasks, record).name for record in records]
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name, []).append(row)
        parts = {name: self.collators[name]([records[i] for i in rows]) for name, rows in groups.items()}
        length = max(part["input_ids"].shape[1] for part in parts.values())
        size = len(records)
        input_ids = torch.full((size, length), self.pad, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((size, length), dtype=torch.long)  # (B, T)
        token_types = any("token_type_ids" in part for part in parts.values())
        token_type_ids = torch.zeros((size, length), dtype=torch.long) if token_types else None
        labels = {}
        for name, rows in groups.items():
            part, index = parts[name], torch.tensor(rows)
            width = part["input_ids"].shape[1]
            input_ids[index, :width] = part["input_ids"]
            attention_mask[index, :width] = part["attention_mask"]
            if token_type_ids is not None and "token_type_ids" in part:
                token_type_ids[index, :width] = part["token_type_ids"]
            task_labels = part["labels"]
            if self.kinds[name] in PER_TOKEN and task_labels.shape[1] < length:  # (n_t, T): pad with -100
                fill = torch.full((len(rows), length - task_labels.shape[1]), IGNORE_INDEX, dtype=task_labels.dtype)
                task_labels = torch.cat([task_labels, fill], dim=1)
            labels[name] = task_labels
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "tasks": names}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return batch


def task_blocks(names: Sequence[str]) -> list[tuple[str, int, int]] | None:
    """``[(task, start, stop)]`` when each task's rows form one contiguous block (the multi-task sampler
    orders a mixed batch by task); None when a task's rows are scattered."""
    groups = chain_groups([[name] for name in names])  # {(task,): rows}, first-appearance order
    sizes = contiguous_sizes(groups, len(names))
    if sizes is None:
        return None
    ends = itertools.accumulate(sizes)
    return [(chain[0], end - size, end) for chain, size, end in zip(groups, sizes, ends, strict=True)]


def block_widths(batch: dict[str, Any], blocks: list[tuple[str, int, int]]) -> list[int]:
    """Each block's columns up to the last one any of its rows attends (right padding: its longest row)."""
    widths = []
    for _, start, stop in blocks:
        used = batch["attention_mask"][start:stop].any(0).nonzero()  # of the block's (n, T) mask
        widths.append(int(used.max()) + 1 if used.numel() else batch["attention_mask"].shape[1])
    return widths


def block_batch(batch: dict[str, Any], task: str, start: int, stop: int, width: int | None = None) -> dict[str, Any]:
    """Rows ``start:stop`` of a mixed batch (all of ``task``'s rows), cut to the block's own longest row
    (``width``, from :func:`block_widths`; computed here when not given).

    Columns where every row of the block is padding are dropped (right padding: the trailing ones), so a
    block of short rows no longer pays for the batch's longest task. Exact: with right padding, dropped
    positions are keys every kept query masks out and labels that are ignored (-100).
    """
    if width is None:
        width = block_widths(batch, [(task, start, stop)])[0]
    length = batch["attention_mask"].shape[1]
    size = len(batch["tasks"])

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == size:
            value = value[start:stop]
            return value[:, :width] if value.dim() >= 2 and value.shape[1] == length else value
        if isinstance(value, list) and len(value) == size:
            return value[start:stop]
        return value

    out = {key: cut(value) for key, value in batch.items() if key != "labels"}
    labels = batch.get("labels")
    if isinstance(labels, dict):
        own = labels.get(task)  # already this task's rows
        if isinstance(own, torch.Tensor) and own.dim() >= 2 and own.shape[1] == length:
            own = own[:, :width]
        out["labels"] = {task: own} if own is not None else {}
    elif labels is not None:
        out["labels"] = cut(labels)
    return out
