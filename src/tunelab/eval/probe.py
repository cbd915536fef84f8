"""The general-ability (forgetting) probe: held-out general-domain perplexity before and after tuning.

Fine-tuning on a domain or a task can cost a model what it knew before (catastrophic forgetting). The
probe measures that on text the model was never tuned on: the same held-out general-domain documents
are scored by the untuned base model (*before*) and by the tuned model as it is evaluated, adapters
active (*after*), as PEFT's method comparison reports "forgetting".

Math. Each document d is tokenized as pretraining text, ``x^d = (BOS, x_1, ..., x_n, EOS)`` cut to
``max_length`` tokens (EOS only when the document was not cut); every position after the first is a
target, padding never is. Over all documents of the probe::

    NLL(θ) = − Σ_d Σ_{t ≥ 1} log p_θ(x^d_t | x^d_<t)          (natural log, summed over tokens)
    N      = Σ_d (|x^d| − 1)                                    (scored tokens; pad excluded)
    PPL(θ) = exp(NLL(θ) / N)                                    (token-weighted, not a mean of
                                                                 per-document or per-batch perplexities)
    general_ppl_change = PPL(θ_after) / PPL(θ_before) − 1       (relative; +0.25 = 25% higher)

``θ_before`` is the untuned base (no adapter, as the runner's ``untuned`` baseline), ``θ_after`` the
cell's model after training (after each stage when there are stages). A positive change is forgetting
of general text; a negative one means tuning also helped on it. The ratio is scale-free, so it compares
across models whose absolute perplexities differ. ``PPL`` comes from :func:`tunelab.eval.metrics.perplexity`
(``exp`` of the summed NLL over all batches divided by the total count).

Text sources (:func:`load_texts`):

- ``synthetic``: pretraining-style documents of the built-in world's *general* domain about the
  entities of its *test* split (:data:`SYNTHETIC_KINDS` of ``synthetic.corpus(domains="general",
  split="test", seed=seed)``): encyclopedic paragraphs and task documents. Every training source of the
  built-in world is about the train split's entities (task records, the DAPT ``corpus`` task, tiny-llama's
  pretraining corpus, ``domain_kd``'s general data, replay buffers, ICL demonstrations), so no probe
  document was trained on. Closed-book ``qa`` documents are left out: that task holds out phrasings, not
  entities, so its training split states facts about test-split entities too (a test checks that no
  probe paragraph is a training example of any task). Cells whose ``data.seed`` differs from ``seed``
  train on another world: other entities (a name may recur by chance, with other facts).
- a path: a ``.jsonl`` file (one JSON object per line with a ``text`` field) or any other file read as
  UTF-8 plain text whose documents are separated by blank lines. The first ``documents`` are scored.

Only causal language models have a next-token perplexity: for an encoder (classification, token
classification, a CLIP model) the probe is skipped, and the result records the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from tunelab.errors import DataError

CAUSAL_LM = "causal_lm"
# corpus document kinds of the synthetic probe: all but closed-book qa (see the module docstring)
SYNTHETIC_KINDS = ("encyclopedia", "summarization", "extractive_qa", "translation", "ner", "urgency",
                   "domain_classification")
SOURCE_HELP = "eval.general_probe.source takes 'synthetic', a .jsonl file with a 'text' field, or a plain-text file"


def skip_reason(model_task: str) -> str | None:
    """Why the probe cannot run for a model of ``model_task`` (None when it can)."""
    if model_task == CAUSAL_LM:
        return None
    return (f"the model is a {model_task.replace('_', ' ')} model, not a causal language model: it has no "
            "next-token perplexity")


def load_texts(source: str, documents: int, seed: int = 0) -> list[str]:
    """The probe's documents (see the module docstring); DataError with one line for a bad file."""
    if source == "synthetic":
        from tunelab.data import synthetic

        return synthetic.corpus(domains=("general",), n_documents=documents, seed=seed, split="test",
                                kinds=SYNTHETIC_KINDS)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"general probe file not found: {source} ({SOURCE_HELP})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"general probe file {source}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise DataError(f"general probe file {source}: cannot read ({error.strerror})") from None
    texts = _jsonl_texts(source, text) if path.suffix.lower() == ".jsonl" else _paragraphs(text)
    if not texts:
        raise DataError(f"general probe file {source} holds no text; give it documents ({SOURCE_HELP})")
    return texts[:documents]


def _jsonl_texts(source: str, text: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"general probe file {source} line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"general probe file {source} line {number}: needs a 'text' field holding a string")
        if row["text"].strip():
            texts.append(row["text"])
    return texts


def _paragraphs(text: str) -> list[str]:
    """Documents of a plain-text file: blocks separated by one or more blank lines."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Each document as ``BOS + tokens + EOS`` cut to ``max_length`` (as the ``lm`` objective encodes text)."""
    from tunelab.data.collate import SegmentEncoder

    encoder = SegmentEncoder(tokenizer, max_length, add_eos=True, mask_prompt=False)
    return [encoder([(text, True)])[0] for text in texts]


def batches(tokenizer, sequences: list[list[int]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches with ``labels`` = the ids, -100 on padding (pad is never scored)."""
    from tunelab import IGNORE_INDEX
    from tunelab.data.collate import pad_right, pad_token_id

    pad = pad_token_id(tokenizer)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        input_ids = pad_right(chunk, pad)  # (B, T)
        attention_mask = pad_right([[1] * len(seq) for seq in chunk], 0, input_ids.shape[1])  # (B, T)
        yield {"input_ids": input_ids, "attention_mask": attention_mask,
               "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)}


def measure(model: torch.nn.Module, tokenizer, sequences: list[list[int]], batch_size: int = 16) -> dict:
    """``{"perplexity": PPL, "tokens": N}`` of ``model`` as it is (its active adapters) on encoded documents."""
    from tunelab.eval.metrics import perplexity

    tokens = sum(max(len(seq) - 1, 0) for seq in sequences)
    if tokens == 0:
        raise DataError("the general probe has no token to score; give it longer documents")
    return {"perplexity": perplexity(model, batches(tokenizer, sequences, batch_size)), "tokens": tokens}


def change(after: float | None, before: float | None) -> float | None:
    """``after / before − 1`` (None when either is missing)."""
    if after is None or before is None or before <= 0:
        return None
    return after / before - 1.0
