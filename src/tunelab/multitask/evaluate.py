"""Scoring each task of a multi-task model with its own adapters, head and metric.

Generation tasks decode greedily (:func:`tunelab.eval.tasks.evaluate_records`, the task's own
metric); classification is accuracy of the head's argmax; token classification is strict IOB2 entity
F1 on first sub-tokens; extractive QA decodes the best span (:func:`tunelab.models.heads.best_spans`
over context tokens and the "no answer" position 0) and scores its text by exact match and token F1
against the gold answers (``""`` for unanswerable questions); ``answered`` is the share of questions
given a span, which shows a model that answers "no answer" to everything. Every task reports ``<task>/score``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tunelab import IGNORE_INDEX
from tunelab.eval import metrics
from tunelab.models.heads import TaskHeads, best_spans
from tunelab.multitask.collate import SpanQACollator
from tunelab.multitask.tasks import TaskSpec


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(records: Sequence[dict], batch_size: int):
    for start in range(0, len(records), batch_size):
        yield list(records[start : start + batch_size])


@torch.no_grad()
def evaluate_head_task(model: nn.Module, heads: TaskHeads, task: TaskSpec, records: Sequence[dict],
                       collate: Callable, batch_size: int = 32) -> dict[str, float]:
    """Metrics of an understanding task (classification, token classification, extractive QA)."""
    device = _device(model)
    if task.kind == "extractive_qa":
        return _evaluate_spans(model, heads, task, records, collate, batch_size)
    correct, total, pred_tags, ref_tags = 0, 0, [], []
    for chunk in _batches(records, batch_size):
        batch = collate(chunk)
        inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
        logits = heads(model, inputs, task=task.name).logits
        labels = batch["labels"].to(logits.device)
        prediction = logits.argmax(-1)
        if task.kind == "classification":
            correct += int((prediction == labels).sum())
            total += len(labels)
            continue
        for row in range(len(chunk)):  # token classification: first sub-tokens carry the word's tag
            keep = labels[row] != IGNORE_INDEX
            pred_tags.append([task.labels[i] for i in prediction[row][keep].tolist()])
            ref_tags.append([task.labels[i] for i in labels[row][keep].tolist()])
    if task.kind == "classification":
        accuracy = correct / max(total, 1)
        return {"accuracy": accuracy, "score": accuracy}
    f1 = metrics.entity_f1(pred_tags, ref_tags)
    return {"entity_f1": f1, "score": f1}


def _evaluate_spans(model, heads, task, records, collate: SpanQACollator, batch_size: int) -> dict[str, float]:
    device = _device(model)
    predictions, references = [], []
    for chunk in _batches(records, batch_size):
        batch = collate(chunk)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = heads(model, inputs, task=task.name).logits  # (B, T, 2)
        encoded = [collate.encode(record) for record in chunk]
        allowed = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)  # (B, T)
        for row, e in enumerate(encoded):
            allowed[row, : len(e["context_mask"])] = torch.tensor(e["context_mask"])
        allowed[:, 0] = True  # the "no answer" position
        start, end, _ = best_spans(logits, task.max_answer_length, mask=allowed)
        for row, (record, e) in enumerate(zip(chunk, encoded, strict=True)):
            s, t = int(start[row]), int(end[row])
            text = "" if s == 0 else record["context"][e["offsets"][s][0] : e["offsets"][t][1]]
            predictions.append(text)
            gold = list((record.get("answers") or {}).get("text") or [])
            references.append(gold or [""])
    exact, f1 = metrics.exact_match(predictions, references), metrics.token_f1(predictions, references)
    # share of questions given a span rather than "no answer" (a diagnostic, left out of Δp): at 0, exact
    # match and token F1 both equal the share of unanswerable questions and the model has learnt nothing
    answered = sum(bool(p) for p in predictions) / max(len(predictions), 1)
    return {"exact_match": exact, "token_f1": f1, "answered": answered, "score": f1}


def evaluate_generation(model: nn.Module, tokenizer: Any, task: TaskSpec, records: Sequence[dict],
                        **kwargs: Any) -> dict[str, float]:
    """Greedy decoding scored by the records' own metric; one task name for all the records' tasks."""
    from tunelab.eval import tasks as task_eval

    results = task_eval.evaluate_records(model, tokenizer, records, **kwargs)
    inner = [key for key in results if key != "score"]
    out = {"score": results["score"]}
    if len({key.split("/", 1)[0] for key in inner}) == 1:  # one record task: keep its metrics
        out.update({key.split("/", 1)[1]: value for key, value in results.items() if key != "score"})
    return out
