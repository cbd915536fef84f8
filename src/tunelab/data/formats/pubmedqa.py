"""PubMedQA (Jin et al. 2019, arXiv:1909.06146): a biomedical question + its abstract -> yes / no / maybe.

The labelled file ``ori_pqal.json`` is one JSON object keyed by PMID, each value
``{QUESTION, CONTEXTS: [abstract paragraphs], LABELS, MESHES, final_decision, LONG_ANSWER, ...}``;
the generic JSON / JSON Lines readers cannot read it, so this reader does. Format name ``pubmedqa``,
also chosen automatically when a ``.json`` file starts with ``{"<key>": {...`` and its first entry
has ``QUESTION`` and ``final_decision`` (:func:`is_pubmedqa`).

Each entry becomes one ``choice`` record (scored generatively by the first word of the answer, see
:mod:`tunelab.eval.tasks`)::

    {"id": "pubmedqa-<PMID>", "task": "pubmedqa", "domain": "medical", "kind": "choice",
     "prompt": "Context: <first max_context_words words of the abstract>\\nQuestion: <QUESTION>\\n"
               "Answer yes, no or maybe.",
     "response": "<final_decision>", "label": "<final_decision>", "choices": ["yes", "no", "maybe"],
     "text": "<QUESTION> <context>"}

The context comes *before* the question so that a prompt cut from the left (the collators and the
generator keep the end of a prompt that is too long) loses abstract words, never the question.
``label`` / ``text`` also make the records usable by the ``classification`` objective (an encoder
with a head). The abstract is cut to ``max_context_words`` words (default 120, then `` ...``) to fit a 256-token budget.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tunelab.errors import DataError

CHOICES = ("yes", "no", "maybe")
MAX_CONTEXT_WORDS = 120
_HEAD = re.compile(r'^\s*\{\s*"[^"]*"\s*:\s*\{')  # a JSON object whose first value is an object


def is_pubmedqa(source: str | os.PathLike) -> bool:
    """Whether ``source`` looks like a PubMedQA keyed object (reads only the first 4 KiB)."""
    path = Path(source)
    if not path.is_file() or path.suffix.lower() != ".json":
        return False
    try:
        with open(path, encoding="utf-8-sig") as handle:
            head = handle.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return bool(_HEAD.match(head)) and '"QUESTION"' in head and ('"CONTEXTS"' in head or '"final_decision"' in head)


def pubmedqa_records(source: str | os.PathLike, limit: int | None = None,
                     max_context_words: int = MAX_CONTEXT_WORDS) -> list[dict]:
    """The entries of a PubMedQA keyed object as ``choice`` records, sorted by PMID (see the module doc)."""
    path = Path(source)
    if not path.is_file():
        raise DataError(f"PubMedQA file not found: {path}")
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(rows, dict):
        raise DataError(f"{path}: PubMedQA is a JSON object keyed by PMID, got a {type(rows).__name__}")
    records = []
    for pmid, row in sorted(rows.items()):
        records.append(_record(path, str(pmid), row, max_context_words))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"no usable records in {path} (format pubmedqa)")
    return records


def _record(path: Path, pmid: str, row: object, max_context_words: int) -> dict:
    where = f"{path} entry {pmid!r}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with QUESTION, CONTEXTS and final_decision")
    missing = [key for key in ("QUESTION", "final_decision") if key not in row]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r} (keys present: {', '.join(map(str, row)) or 'none'})")
    label = str(row["final_decision"]).strip().lower()
    if label not in CHOICES:
        raise DataError(f"{where}: final_decision must be one of {', '.join(CHOICES)}, got {row['final_decision']!r}")
    contexts = row.get("CONTEXTS") or []
    if isinstance(contexts, str):
        contexts = [contexts]
    question = " ".join(str(row["QUESTION"]).split())
    words = " ".join(map(str, contexts)).split()
    context = " ".join(words[:max_context_words]) + (" ..." if len(words) > max_context_words else "")
    prompt = (f"Context: {context}\n" if context else "") + f"Question: {question}\nAnswer yes, no or maybe."
    return {"id": f"pubmedqa-{pmid}", "task": "pubmedqa", "domain": "medical", "kind": "choice",
            "prompt": prompt, "response": label, "label": label, "choices": list(CHOICES),
            "text": f"{question} {context}".strip()}
