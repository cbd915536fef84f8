"""Readers for NLP benchmark files and for a multi-task manifest.

- ``conll``: CoNLL-2003-style text, one ``token ... TAG`` line per word (the tag is the last column),
  a blank line between sentences, ``-DOCSTART-`` lines skipped -> ``ner`` records
  (``tokens``, ``ner_tags``).
- ``squad``: SQuAD v1/v2 JSON (``data[].paragraphs[].qas[]``) -> ``extractive_qa`` records
  (``context``, ``question``, ``answers: {text, answer_start}``; empty lists for unanswerable v2
  questions), with a ``prompt`` / ``response`` rendering like the built-in extractive QA.
- ``tasks``: a YAML manifest listing several files, each loaded by :func:`load_records` and tagged
  with its task name — the input of multi-task runs on real data::

      root: ../shared/data          # optional; relative paths below resolve against it
      tasks:
        - {task: sst2, source: nlp/sst2_train_60614.tsv, columns: {text: sentence, label: label}, limit: 2000}
        - {task: conll, source: nlp/conll2003/train.txt, format: conll, limit: 2000}
        - {task: squad, source: nlp/squad_v2_dev_2articles_haystack_small.json, format: squad}

  ``root`` (default: the manifest's folder) is itself relative to the working directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

NLP_FORMATS = ("conll", "squad", "tasks")
MANIFEST_KEYS = {"task", "source", "format", "columns", "limit", "domain"}


def conll_records(path: Path, limit: int | None = None) -> list[dict]:
    records, tokens, tags = [], [], []

    def flush() -> None:
        if tokens:
            text = " ".join(tokens)
            records.append({"kind": "ner", "tokens": list(tokens), "ner_tags": list(tags),
                            "prompt": f"Tag the entities: {text}", "response": _entities(tokens, tags)})
            tokens.clear()
            tags.clear()

    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                flush()
            elif parts[0] == "-DOCSTART-":
                continue
            elif len(parts) < 2:
                raise DataError(f"{path}:{number}: a CoNLL line needs a token and a tag, got {line.strip()!r}")
            else:
                tokens.append(parts[0])
                tags.append(parts[-1])
            if limit is not None and len(records) >= limit:
                break
    flush()
    return records[:limit]


def _entities(tokens: list[str], tags: list[str]) -> str:
    spans, current = [], None
    for token, tag in zip(tokens, tags, strict=True):
        if tag.startswith("B-") or (tag.startswith("I-") and (current is None or current[1] != tag[2:])):
            current = [[token], tag[2:]]
            spans.append(current)
        elif tag.startswith("I-"):
            current[0].append(token)
        else:
            current = None
    return "; ".join(f"{' '.join(words)} [{kind}]" for words, kind in spans)


def squad_records(path: Path, limit: int | None = None) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not SQuAD JSON (need data[].paragraphs[].qas[]): {error}") from None
    records = []
    for article in data:
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                texts = [a["text"] for a in answers[:1]]
                records.append({"id": str(qa.get("id", len(records))), "kind": "extractive_qa", "context": context,
                                "question": qa["question"],
                                "answers": {"text": texts, "answer_start": [a["answer_start"] for a in answers[:1]]},
                                "prompt": f"Answer from the context.\nContext: {context}\nQuestion: {qa['question']}",
                                "response": texts[0] if texts else ""})
                if limit is not None and len(records) >= limit:
                    return records
    return records


def manifest_records(path: Path, limit: int | None, load: Callable[..., list[dict]],
                     domain: str | None = None) -> list[dict]:
    import yaml

    try:
        manifest = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise DataError(f"{path}: malformed YAML manifest ({error})") from None
    entries = manifest.get("tasks") if isinstance(manifest, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: a task manifest needs a non-empty 'tasks' list of {{task, source, ...}}")
    root = Path(manifest.get("root") or Path(path).parent)
    records: list[dict] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"task", "source"} <= set(entry):
            raise DataError(f"{path}: tasks[{index}] needs 'task' and 'source'")
        unknown = sorted(set(entry) - MANIFEST_KEYS)
        if unknown:
            raise DataError(f"{path}: tasks[{index}] has unknown key {unknown[0]!r}; keys: {', '.join(sorted(MANIFEST_KEYS))}")
        source = Path(entry["source"])
        source = source if source.is_absolute() else root / source
        rows = load(source, format=entry.get("format"), columns=entry.get("columns"), limit=entry.get("limit"),
                    domain=str(entry["domain"]) if entry.get("domain") is not None else domain)
        for row_index, row in enumerate(rows):
            row["task"] = str(entry["task"])
            row["id"] = f"{entry['task']}-{row_index}"
        records += rows
    return records[:limit] if limit is not None else records


def load_nlp(source: str | os.PathLike, format: str, limit: int | None, load: Callable[..., list[dict]],
             domain: str | None = None) -> list[dict]:
    """Records of a ``conll`` / ``squad`` file or a ``tasks`` manifest (``load``: :func:`load_records`);
    ``domain`` for records that name none (a manifest entry's ``domain`` comes first)."""
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if format == "tasks":
        return manifest_records(path, limit, load, domain)
    records: list[Any] = conll_records(path, limit) if format == "conll" else squad_records(path, limit)
    if not records:
        raise DataError(f"no usable records in {path} (format {format})")
    for index, record in enumerate(records):
        record.setdefault("id", f"{path.stem}-{index}")
        record["id"] = record["id"] or f"{path.stem}-{index}"
        record.setdefault("task", path.stem)
        record.setdefault("domain", domain or "general")
    return records
