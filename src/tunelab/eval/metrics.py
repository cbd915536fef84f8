"""Evaluation metrics: pure functions over parallel lists of predictions and references.

Every list metric takes ``preds`` and ``refs`` of equal length and returns the *mean over examples* of
a per-example score in [0, 1] (except :func:`entity_f1` / :func:`entity_set_f1`, which are micro F1 over
all entities, and :func:`perplexity`, which is >= 1). Conventions shared by all of them:

- Mismatched lengths raise ``ValueError``; so does an empty input (a mean over no examples is
  undefined, and an empty evaluation set is almost always a bug upstream).
- Where a reference may have several acceptable answers (``exact_match``, ``token_f1``, ``rouge_l``,
  ``span_f1``), ``refs[i]`` may be a string (or span) or a list of them; the example scores the *max*
  over its references, as the SQuAD evaluation script does.

Text normalisation (:func:`normalize_answer`) follows the official SQuAD v1.1/v2.0 script
(Rajpurkar et al., 2016, https://rajpurkar.github.io/SQuAD-explorer/): lowercase, drop ASCII
punctuation, drop the articles "a", "an", "the", collapse whitespace. Token F1 is the F1 of the
bag-of-words overlap between the normalised prediction and reference.

Perplexity is ``exp(sum of token NLL / number of scored tokens)`` over *all* tokens of *all* batches
(token-weighted), never the mean of per-batch losses, which would over-weight short batches.
"""

from __future__ import annotations

import math
import numbers
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from tunelab import IGNORE_INDEX  # the one definition; re-exported for older imports

Answer = str | Sequence[str]  # one reference string or several acceptable ones

Span = tuple[int, int]  # (start, end) character offsets, end exclusive

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


# --------------------------------------------------------------------------------------------- helpers
def _check_lengths(preds: Sequence, refs: Sequence, name: str) -> None:
    if len(preds) != len(refs):
        raise ValueError(
            f"{name}: got {len(preds)} predictions but {len(refs)} references; pass one of each per example"
        )
    if len(preds) == 0:
        raise ValueError(f"{name}: got no examples; pass at least one prediction/reference pair")


def _as_list(ref: Answer) -> list[str]:
    """A reference as a non-empty list of acceptable answers."""
    if isinstance(ref, str):
        return [ref]
    answers = list(ref)
    return answers if answers else [""]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, remove articles, collapse whitespace.

    Example: ``"The  Eiffel-Tower!"`` -> ``"eiffeltower"``. (Punctuation is deleted, not replaced by a
    space, exactly as in the official script.)
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _exact(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def _f1(pred: str, ref: str) -> float:
    """SQuAD token F1 of one pair; two empty answers score 1 (SQuAD v2 convention)."""
    pred_tokens = normalize_answer(pred).split()
    ref_tokens = normalize_answer(ref).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _f1_from_counts(true_positives: int, n_pred: int, n_ref: int) -> float:
    """F1 from counts; nothing predicted and nothing to find is a perfect 1.0."""
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if true_positives == 0:
        return 0.0
    precision = true_positives / n_pred
    recall = true_positives / n_ref
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------ text metrics
def exact_match(preds: Sequence[str], refs: Sequence[Answer]) -> float:
    """Fraction of predictions equal to (one of) their references after SQuAD normalisation.

    ``EM = mean_i max_{r in refs_i} [normalize(pred_i) == normalize(r)]``
    """
    _check_lengths(preds, refs, "exact_match")
    return sum(max(_exact(p, r) for r in _as_list(rs)) for p, rs in zip(preds, refs, strict=True)) / len(
        preds
    )


def token_f1(preds: Sequence[str], refs: Sequence[Answer]) -> float:
    """SQuAD token F1, averaged over examples.

    Per example: normalise both texts, split on whitespace, ``overlap = |pred ∩ ref|`` as multisets,
    ``P = overlap / |pred|``, ``R = overlap / |ref|``, ``F1 = 2PR / (P + R)`` (0 when no overlap; 1 when
    both are empty), maximised over the example's references.
    """
    _check_lengths(preds, refs, "token_f1")
    return sum(max(_f1(p, r) for r in _as_list(rs)) for p, rs in zip(preds, refs, strict=True)) / len(preds)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported lazily: it pulls in nltk

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(preds: Sequence[str], refs: Sequence[Answer]) -> float:
    """ROUGE-L F-measure (longest common subsequence, Lin 2004), averaged over examples.

    Uses ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])`` (no stemming). Its default tokenizer
    lowercases and *replaces every character outside [a-z0-9] with a space*, so punctuation is ignored
    and text in non-Latin scripts (or accented letters) tokenises to nothing and scores 0. A pair whose
    reference or prediction has no tokens scores 0.
    """
    _check_lengths(preds, refs, "rouge_l")
    scorer = _rouge_scorer()
    total = 0.0
    for pred, answers in zip(preds, refs, strict=True):
        total += max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in _as_list(answers))
    return total / len(preds)


def accuracy(preds: Sequence, refs: Sequence) -> float:
    """Fraction of ``preds[i] == refs[i]`` (plain equality: normalise labels before calling)."""
    _check_lengths(preds, refs, "accuracy")
    return sum(float(p == r) for p, r in zip(preds, refs, strict=True)) / len(preds)


# -------------------------------------------------------------------------------------- span metrics
def _span_pair_f1(pred: Span, ref: Span) -> float:
    pred_len, ref_len = max(0, pred[1] - pred[0]), max(0, ref[1] - ref[0])
    if pred_len == 0 or ref_len == 0:
        return float(pred_len == ref_len)  # two empty spans ("no answer") agree
    overlap = max(0, min(pred[1], ref[1]) - max(pred[0], ref[0]))
    if overlap == 0:
        return 0.0
    precision, recall = overlap / pred_len, overlap / ref_len
    return 2 * precision * recall / (precision + recall)


def span_f1(pred_spans: Sequence[Span], ref_spans: Sequence[Span | Sequence[Span]]) -> float:
    """Character-overlap F1 between predicted and reference answer spans, averaged over examples.

    Spans are ``(start, end)`` character offsets into the context, ``end`` exclusive. Per example:
    ``overlap = max(0, min(e_p, e_r) - max(s_p, s_r))``, ``P = overlap / (e_p - s_p)``,
    ``R = overlap / (e_r - s_r)``, ``F1 = 2PR / (P + R)``; two empty spans score 1. ``ref_spans[i]`` may
    be one span or a list of spans (the max is taken). For the SQuAD metric on answer *text*, use
    :func:`span_text_f1`.
    """
    _check_lengths(pred_spans, ref_spans, "span_f1")
    total = 0.0
    for pred, refs in zip(pred_spans, ref_spans, strict=True):
        candidates = [refs] if len(refs) == 2 and isinstance(refs[0], numbers.Integral) else list(refs)
        total += max((_span_pair_f1(tuple(pred), tuple(r)) for r in candidates), default=0.0)
    return total / len(pred_spans)


def span_text_f1(pred_texts: Sequence[str], ref_texts: Sequence[Answer]) -> float:
    """SQuAD's extractive-QA F1: :func:`token_f1` on the answer texts (max over gold answers)."""
    return token_f1(pred_texts, ref_texts)


# ------------------------------------------------------------------------------------ entity metrics
def entity_f1(pred_tag_seqs: Sequence[Sequence[str]], ref_tag_seqs: Sequence[Sequence[str]]) -> float:
    """Micro entity-level F1 over BIO tag sequences, computed by ``seqeval`` in strict IOB2 mode.

    An entity is a maximal ``B-X I-X ...`` run; it counts as correct only if its type and both
    boundaries match a reference entity. In strict mode an ``I-X`` with no preceding ``B-X``/``I-X``
    starts no entity. ``F1 = 2PR / (P + R)`` with P, R pooled over all entities of all sentences. When
    neither side contains any entity the result is 1.0 (seqeval would report an ill-defined 0).
    """
    from seqeval.metrics import f1_score
    from seqeval.metrics.sequence_labeling import get_entities
    from seqeval.scheme import IOB2

    _check_lengths(pred_tag_seqs, ref_tag_seqs, "entity_f1")
    for i, (pred, ref) in enumerate(zip(pred_tag_seqs, ref_tag_seqs, strict=True)):
        if len(pred) != len(ref):
            raise ValueError(
                f"entity_f1: sentence {i} has {len(pred)} predicted tags but {len(ref)} reference tags"
            )
    preds = [list(seq) for seq in pred_tag_seqs]
    refs = [list(seq) for seq in ref_tag_seqs]
    if not any(get_entities(seq) for seq in preds) and not any(get_entities(seq) for seq in refs):
        return 1.0
    return float(f1_score(refs, preds, mode="strict", scheme=IOB2, average="micro", zero_division=0))


def entity_set_f1(
    pred_entity_sets: Sequence[Iterable[tuple[str, str]]],
    ref_entity_sets: Sequence[Iterable[tuple[str, str]]],
) -> float:
    """Micro F1 over sets of ``(entity text, entity type)`` pairs, one set per example.

    ``TP = sum_i |pred_i ∩ ref_i|``, ``P = TP / sum_i |pred_i|``, ``R = TP / sum_i |ref_i|``; texts are
    compared after collapsing whitespace (case-sensitive). No entities on either side gives 1.0.
    """
    _check_lengths(pred_entity_sets, ref_entity_sets, "entity_set_f1")
    true_positives = n_pred = n_ref = 0
    for pred, ref in zip(pred_entity_sets, ref_entity_sets, strict=True):
        pred_set = {(" ".join(text.split()), kind.strip()) for text, kind in pred}
        ref_set = {(" ".join(text.split()), kind.strip()) for text, kind in ref}
        true_positives += len(pred_set & ref_set)
        n_pred += len(pred_set)
        n_ref += len(ref_set)
    return _f1_from_counts(true_positives, n_pred, n_ref)


# -------------------------------------------------------------------------------------------- perplexity
def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batch_nll(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[float, int]:
    """(sum of next-token NLL, number of scored tokens) of one batch."""
    device = _model_device(model)
    input_ids = batch["input_ids"].to(device)  # (B, T)
    attention_mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    labels = batch.get("labels")
    if labels is None:  # score every real token
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels = labels.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    # HF causal-LM convention: position t predicts labels[t + 1].
    shift_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    nll = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return nll.item(), int((shift_labels != IGNORE_INDEX).sum().item())


def perplexity(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Token-weighted perplexity of a causal LM: ``exp(sum_t NLL_t / N)`` over all batches.

    Args:
        model: a causal LM whose output has ``.logits`` of shape (B, T, V).
        batches: dicts with ``input_ids`` (B, T), optional ``attention_mask`` (B, T) and optional
            ``labels`` (B, T) aligned with ``input_ids`` (shifted inside, HF convention). Tokens whose
            label is -100 are not scored; without ``labels`` every attended token is scored.

    Returns:
        ``exp(total NLL / N)`` where N counts the scored (label != -100) next-token targets of all
        batches together, so batches with more tokens weigh more.

    Raises:
        ValueError: if no token is scored at all.
    """
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                nll, count = _batch_nll(model, batch)
                total_nll += nll
                total_tokens += count
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError(
            "perplexity: no scored tokens (every label is -100); pass batches with labels to score"
        )
    return math.exp(total_nll / total_tokens)
