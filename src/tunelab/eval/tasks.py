"""Task-level evaluation: pick the right metrics for each kind of record and compute them.

Causal LMs are evaluated *generatively*: each record's prompt is rendered with the chosen template,
continued greedily (:func:`tunelab.eval.generate.greedy`), and the continuation is scored against the
record's reference according to the record's ``kind``:

=================  ======================================  ====================================
kind               metrics                                 main metric (``<task>/score``)
=================  ======================================  ====================================
generation         exact_match, token_f1, rouge_l          rouge_l; exact_match for task "qa"
classification     accuracy of the normalised first line   accuracy
choice             accuracy (and macro-F1) of the chosen   accuracy
                   option: the first word(s) of the answer
extractive_qa      exact_match, token_f1 (SQuAD, 1st line)  exact_match
ner                entity_f1 over (text, type) sets        entity_f1
=================  ======================================  ====================================

Records are grouped by ``task`` (falling back to ``kind``); the result maps ``"<task>/<metric>"`` to
floats, plus ``"<task>/score"`` (the group's main metric) and ``"score"``, the unweighted macro
average of the group scores.

Encoder models are evaluated discriminatively: :func:`evaluate_classifier` (argmax accuracy) and
:func:`evaluate_tagger` (seqeval entity F1 of the first-subtoken predictions).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from tunelab import IGNORE_INDEX  # the one definition; re-exported for older imports
from tunelab.errors import DataError
from tunelab.eval import metrics
from tunelab.eval.generate import greedy, progress_bar

# Main metric of a group: by record kind; for generation kinds the task name may refine it.
MAIN_METRIC_BY_TASK = {"qa": "exact_match", "summarization": "rouge_l", "translation": "rouge_l"}
MAIN_METRIC_BY_KIND = {
    "generation": "rouge_l",
    "chat": "rouge_l",
    "classification": "accuracy",
    "choice": "accuracy",
    "extractive_qa": "exact_match",
    "ner": "entity_f1",
}

_PREDICTIONS: ContextVar[list | None] = ContextVar("tunelab_predictions", default=None)


@contextmanager
def recording() -> Iterator[list[dict]]:
    """Collect every prediction the evaluators in this module make, for reports and files::

        with recording() as predictions:
            objective.evaluate(model, records)
        predictions  # [{"id", "prompt", "reference", "prediction"}, ...] (classifiers: label / prediction)
    """
    collected: list[dict] = []
    token = _PREDICTIONS.set(collected)
    try:
        yield collected
    finally:
        _PREDICTIONS.reset(token)


def _record_predictions(rows: list[dict]) -> None:
    collected = _PREDICTIONS.get()
    if collected is not None:
        collected.extend(rows)


_ENTITY = re.compile(r"^(?P<text>.+?)\s*\[(?P<type>[^\[\]]+)\]$")  # "Zelvorin [DRUG]"


# ------------------------------------------------------------------------------------------ rendering
def _find_renderer() -> Callable[..., str] | None:
    """``render_prompt`` from ``tunelab.data.templates`` or ``tunelab.data.formats``, if either exists."""
    for module_name in ("tunelab.data.templates", "tunelab.data.formats"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:  # the module exists but one of *its* imports is missing
                raise
            continue
        renderer = getattr(module, "render_prompt", None)
        if renderer is not None:
            return renderer
    return None


def render(record: Mapping[str, Any], template: str = "plain", tokenizer=None) -> str:
    """The prompt text a model is asked to continue for ``record``.

    Uses ``render_prompt(record, template)`` from ``tunelab.data.templates`` (or ``tunelab.data.formats``)
    when available, so evaluation prompts match training prompts; otherwise ``record["prompt"] + "\\n"``.
    """
    renderer = _find_renderer()
    if renderer is None:
        if "prompt" not in record:
            raise DataError(
                f"record {record.get('id', '?')!r} has no 'prompt'; give every record a prompt/response"
            )
        return str(record["prompt"]) + "\n"
    if tokenizer is not None and "tokenizer" in inspect.signature(renderer).parameters:
        return renderer(record, template, tokenizer=tokenizer)
    return renderer(record, template)


# -------------------------------------------------------------------------------------------- parsing
def first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped (a model may keep talking after its answer)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def chosen_option(text: str, choices: Sequence[str] | None = None) -> str:
    """The option an answer starts with, normalised (lowercase, no punctuation): ``"Yes, because…"`` -> ``"yes"``.

    With ``choices``, the longest option whose words open the answer (so ``"Sci/Tech news"`` picks
    ``"sci/tech"`` among multi-word labels); without, or when none matches, the answer's first word.
    """
    words = metrics.normalize_answer(text).split()
    for option in sorted(choices or (), key=lambda c: -len(metrics.normalize_answer(str(c)).split())):
        option_words = metrics.normalize_answer(str(option)).split()
        if option_words and words[: len(option_words)] == option_words:
            return " ".join(option_words)
    return words[0] if words else ""


def parse_entities(text: str) -> set[tuple[str, str]]:
    """Entities in a NER response string, as a set of ``(text, TYPE)``.

    Format: entries separated by ``;`` or newlines, each ``<entity text> [<TYPE>]``, e.g.
    ``"Zelvorin [DRUG]; migraine [CONDITION]"``. Entries that do not match (such as ``"none"``) are
    ignored, so a response without entities parses to the empty set.
    """
    entities = set()
    for piece in re.split(r"[;\n]", text):
        match = _ENTITY.match(piece.strip())
        if match:
            entities.add((" ".join(match["text"].split()), match["type"].strip()))
    return entities


# -------------------------------------------------------------------------------------------- scoring
def reference_text(record: Mapping[str, Any]) -> str:
    """The gold answer of a generation/chat record: ``response``, else the final assistant turn."""
    if "response" in record:
        return str(record["response"])
    messages = record.get("messages") or []
    if messages and messages[-1].get("role") == "assistant":
        return str(messages[-1]["content"])
    raise DataError(
        f"record {record.get('id', '?')!r} has no 'response' nor a final assistant message to compare with"
    )


def _group_key(record: Mapping[str, Any]) -> str:
    return str(record.get("task") or record.get("kind") or "generation")


def main_metric(task: str, kind: str) -> str:
    """The metric reported as ``<task>/score``; the by-task table refines generation kinds only."""
    by_kind = MAIN_METRIC_BY_KIND.get(kind, "rouge_l")
    if kind in ("generation", "chat"):
        return MAIN_METRIC_BY_TASK.get(task, by_kind)
    return by_kind


def _score_kind(
    kind: str, records: Sequence[Mapping[str, Any]], generations: Sequence[str]
) -> dict[str, float]:
    if kind in ("generation", "chat"):
        refs = [list(r["references"]) if r.get("references") else reference_text(r) for r in records]
        return {
            "exact_match": metrics.exact_match(generations, refs),
            "token_f1": metrics.token_f1(generations, refs),
            "rouge_l": metrics.rouge_l(generations, refs),
        }
    if kind == "classification":
        preds = [metrics.normalize_answer(first_line(g)) for g in generations]
        refs = [metrics.normalize_answer(str(r.get("label", r.get("response", "")))) for r in records]
        return {"accuracy": metrics.accuracy(preds, refs)}
    if kind == "choice":  # a generative multiple-choice answer (PubMedQA yes / no / maybe): its first word(s)
        preds = [chosen_option(g, r.get("choices")) for r, g in zip(records, generations, strict=True)]
        refs = [metrics.normalize_answer(str(r.get("label", r.get("response", "")))) for r in records]
        return {"accuracy": metrics.accuracy(preds, refs), "macro_f1": macro_f1(preds, refs)}
    if kind == "extractive_qa":
        preds = [first_line(g) for g in generations]
        refs = [list(r["answers"]["text"]) if "answers" in r else [str(r["response"])] for r in records]
        return {"exact_match": metrics.exact_match(preds, refs), "token_f1": metrics.token_f1(preds, refs)}
    if kind == "ner":
        preds = [parse_entities(g) for g in generations]
        refs = [parse_entities(str(r["response"])) for r in records]
        return {"entity_f1": metrics.entity_set_f1(preds, refs)}
    raise DataError(
        f"cannot evaluate records of kind {kind!r} by generation; drop them or evaluate them with their own method"
    )


def score_generations(
    records: Sequence[Mapping[str, Any]], generations: Sequence[str], kind: str | None = None
) -> dict[str, float]:
    """Metrics of one group of records (one task) given the model's generated texts.

    Args:
        records: records of a single kind.
        generations: the generated continuation of each record's prompt.
        kind: the records' kind; default ``records[0]["kind"]`` (or "generation").

    Returns:
        The kind's metrics (see the module table) plus ``score``, the main metric.
    """
    if len(records) != len(generations):
        raise ValueError(f"score_generations: {len(records)} records but {len(generations)} generations")
    if not records:
        raise ValueError("score_generations: got no records; pass at least one")
    kind = kind or str(records[0].get("kind", "generation"))
    kinds = {str(r.get("kind", kind)) for r in records}
    if kinds != {kind}:
        raise DataError(
            f"task {_group_key(records[0])!r} mixes record kinds {sorted(kinds)}; give each kind its own task name"
        )
    scores = _score_kind(kind, records, generations)
    scores["score"] = scores[main_metric(_group_key(records[0]), kind)]
    return scores


def evaluate_records(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    template: str = "plain",
    limit: int | None = None,
    progress: bool = True,
    max_prompt_tokens: int | None = None,
) -> dict[str, float]:
    """Evaluate a causal LM generatively on records of any mix of tasks.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        records: tunelab records (see docs/internals.md § Records); grouped by ``task`` (else ``kind``).
        max_new_tokens: generation budget per record.
        batch_size: prompts decoded together.
        template: prompt template name, passed to ``render``.
        limit: evaluate at most this many records *per task* (the first ones), or all when None.
        progress: show a progress bar over generation batches.
        max_prompt_tokens: prompts are cut from the left to this many tokens, as in training
            (``data.max_length``); always to the model's position limit (:func:`greedy`).

    Returns:
        ``{"<task>/<metric>": value, ..., "<task>/score": main metric, "score": macro average}``.
    """
    if not records:
        raise DataError("evaluate_records got no records; pass a non-empty evaluation set")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        group = groups.setdefault(_group_key(record), [])
        if limit is None or len(group) < limit:
            group.append(record)
    selected = [r for group in groups.values() for r in group]
    prompts = [render(r, template, tokenizer=tokenizer) for r in selected]
    generations = greedy(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
        max_prompt_tokens=max_prompt_tokens,
    )
    _record_predictions([{"id": r.get("id"), "task": _group_key(r), "prompt": p,
                          "reference": r.get("response", r.get("label")), "prediction": g}
                         for r, p, g in zip(selected, prompts, generations, strict=True)])
    results: dict[str, float] = {}
    start = 0
    for task, group in groups.items():
        if not group:  # limit=0
            continue
        scores = score_generations(group, generations[start : start + len(group)])
        start += len(group)
        results.update({f"{task}/{name}": value for name, value in scores.items()})
    task_scores = [value for key, value in results.items() if key.endswith("/score")]
    if not task_scores:
        raise DataError(f"limit={limit} leaves no record to evaluate; use limit >= 1 or None")
    results["score"] = sum(task_scores) / len(task_scores)
    return results


def evaluate_task(
    model: torch.nn.Module, tokenizer, records: Sequence[Mapping[str, Any]], task_kind: str, **kwargs
) -> dict[str, float]:
    """Evaluate records of one kind; returns the kind's metrics without a task prefix, plus ``score``.

    ``kwargs`` are those of :func:`evaluate_records` (``max_new_tokens``, ``batch_size``, ``template``,
    ``limit``, ``progress``). Every record is treated as ``task_kind``.
    """
    limit = kwargs.pop("limit", None)
    records = list(records)[:limit] if limit is not None else list(records)
    if not records:
        raise DataError("evaluate_task got no records; pass a non-empty evaluation set")
    template = kwargs.pop("template", "plain")
    prompts = [render(r, template, tokenizer=tokenizer) for r in records]
    generations = greedy(model, tokenizer, prompts, **kwargs)
    relabelled = [{**r, "kind": task_kind} for r in records]
    return score_generations(relabelled, generations, kind=task_kind)


# ---------------------------------------------------------------------------- encoder (discriminative)
def _logits_and_labels(model: torch.nn.Module, records, collator, batch_size: int, progress: bool):
    """Yield (logits, labels) per batch, in eval mode and without gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_batches = -(-len(records) // batch_size)
    try:
        with (
            torch.no_grad(),
            progress_bar(n_batches, "evaluating", enabled=progress and n_batches > 1) as advance,
        ):
            for start in range(0, len(records), batch_size):
                batch = dict(collator(list(records[start : start + batch_size])))
                labels = batch.pop("labels")
                inputs = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
                yield model(**inputs).logits.cpu(), labels.cpu()
                advance()
    finally:
        model.train(was_training)


def evaluate_classifier(
    model: torch.nn.Module,
    records: Sequence[Mapping[str, Any]],
    collator,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, float]:
    """Accuracy and macro-F1 of a sequence classifier: ``mean(argmax(logits) == label)``.

    ``collator(list_of_records)`` must return tensors including ``labels`` (B,) of class ids; logits
    are (B, C). Macro-F1 is the unweighted mean over the classes present (in references or
    predictions) of ``2·P·R / (P + R)``, so a model that always answers the majority class scores its
    frequency in accuracy but far less in macro-F1. Returns ``{"accuracy", "macro_f1", "score"}``.
    """
    if not records:
        raise DataError("evaluate_classifier got no records; pass a non-empty evaluation set")
    preds, refs = [], []
    for logits, labels in _logits_and_labels(model, records, collator, batch_size, progress):
        preds += logits.argmax(dim=-1).tolist()  # (B,)
        refs += labels.tolist()
    value = metrics.accuracy(preds, refs)
    names = getattr(collator, "label_names", None)
    _record_predictions([{"id": r.get("id"), "text": r.get("text"), "reference": _name(names, y), "prediction": _name(names, p)}
                         for r, y, p in zip(records, refs, preds, strict=True)])
    return {"accuracy": value, "macro_f1": macro_f1(preds, refs), "score": value}


def _name(names: Sequence[str] | None, index: int) -> str | int:
    return names[index] if names is not None and 0 <= index < len(names) else index


def macro_f1(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    """Unweighted mean F1 over every class that occurs in ``refs`` or ``preds``."""
    classes = set(refs) | set(preds)
    scores = []
    for label in classes:
        true_pos = sum(p == label and y == label for p, y in zip(preds, refs, strict=True))
        predicted, actual = sum(p == label for p in preds), sum(y == label for y in refs)
        scores.append(0.0 if true_pos == 0 else 2 * true_pos / (predicted + actual))
    return sum(scores) / len(scores) if scores else 0.0


def evaluate_tagger(
    model: torch.nn.Module,
    records: Sequence[Mapping[str, Any]],
    collator,
    label_names: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, float]:
    """Entity F1 (seqeval, strict IOB2, micro) of a token classifier on first-subtoken predictions.

    ``collator`` must return ``labels`` (B, T) holding the word's tag id on the first sub-token of each
    word and -100 elsewhere (special tokens, later sub-tokens, padding); the prediction for a word is
    the argmax at that position. Words cut by truncation are absent from both sides. Returns
    ``{"entity_f1", "token_accuracy", "score"}``.
    """
    if not records:
        raise DataError("evaluate_tagger got no records; pass a non-empty evaluation set")
    pred_seqs, ref_seqs = [], []
    for logits, labels in _logits_and_labels(model, records, collator, batch_size, progress):
        predicted = logits.argmax(dim=-1)  # (B, T)
        for row_pred, row_labels in zip(predicted, labels, strict=True):
            keep = row_labels != IGNORE_INDEX  # first sub-token of each word
            pred_seqs.append([label_names[i] for i in row_pred[keep].tolist()])
            ref_seqs.append([label_names[i] for i in row_labels[keep].tolist()])
    flat_pred = [tag for seq in pred_seqs for tag in seq]
    flat_ref = [tag for seq in ref_seqs for tag in seq]
    if not flat_ref:
        raise DataError(
            "evaluate_tagger found no labelled tokens (all labels are -100); check the collator's label alignment"
        )
    value = metrics.entity_f1(pred_seqs, ref_seqs)
    return {"entity_f1": value, "token_accuracy": metrics.accuracy(flat_pred, flat_ref), "score": value}
