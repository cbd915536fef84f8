"""Loading: pick the reader for the source, the converter for its format, and number the records.

:func:`load_records` reads the first raw row, chooses the converter (explicit ``format=``, implied by
``columns=``, or guessed by :func:`guess_format` from the row's keys) and streams the rest through it,
stopping at ``limit``; every record gets an ``id``, ``task`` and ``domain`` when the converter set none
(the ``domain`` column of the file, else the ``domain=`` argument, else ``"general"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from tunelab.data.formats.chat import _oasst, _sharegpt
from tunelab.data.formats.common import Row, _chain, _row_by_row
from tunelab.data.formats.files import _delimiter, _existing_file, _hf_rows, _json_rows, _stem, _table_rows
from tunelab.data.formats.instruction import _alpaca, _dolly
from tunelab.data.formats.mapped import _mapped
from tunelab.data.formats.nlp import NLP_FORMATS, load_nlp
from tunelab.data.formats.preference import ASSISTANT, HUMAN, _hh_rlhf
from tunelab.data.formats.pubmedqa import is_pubmedqa, pubmedqa_records
from tunelab.errors import DataError

FORMATS = ("alpaca", "dolly", "oasst", "sharegpt", "hh_rlhf", "jsonl", "csv", "tsv", "hf", *NLP_FORMATS, "pubmedqa")
MAPPED_FORMATS = ("jsonl", "csv", "tsv")  # generic rows + a column mapping


def load_records(
    source: str | os.PathLike,
    format: str | None = None,
    columns: dict[str, str | int] | None = None,
    split: str | None = None,
    limit: int | None = None,
    domain: str | None = None,
) -> list[dict]:
    """Load a data file (or a Hugging Face dataset) as canonical records.

    Args:
        source: a file path (``.json``, ``.jsonl``, ``.csv``, ``.tsv``, each optionally ``.gz``), or with
            ``format="hf"`` a dataset name, ``"name"`` or ``"name:config"``.
        format: one of ``FORMATS``; None guesses from the file name and the first row's keys.
        columns: canonical key -> source column, e.g. ``{"prompt": "question", "response": "answer"}``
            or ``{"text": 0, "label": 1}`` (indices: the CSV/TSV has no header line).
        split: the Hugging Face split (default ``"train"``); local files have no splits.
        limit: return at most this many records (reading stops early where the format allows).
        domain: the domain of records whose row names none (a ``domain`` column); default ``"general"``.

    Returns:
        Records with ``id``, ``kind``, ``task`` (the file stem or dataset name) and ``domain`` (the row's
        ``domain`` column, else ``domain``) plus the keys of their kind.
    """
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; valid formats: {', '.join(FORMATS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}")
    if format is None and str(source).endswith((".yaml", ".yml")):
        format = "tasks"  # a multi-task manifest (tunelab.data.formats.nlp)
    if format is None and not columns and is_pubmedqa(source):
        format = "pubmedqa"  # a JSON object keyed by PMID (tunelab.data.formats.pubmedqa)
    if format in NLP_FORMATS:
        return load_nlp(source, format, limit, load_records, domain)
    if format == "pubmedqa":
        if columns:
            raise DataError("columns= applies to jsonl/csv/tsv/hf data, not to format 'pubmedqa'; drop it")
        return pubmedqa_records(source, limit)
    if format == "hf":
        name = str(source)
        rows, origin, task = _hf_rows(name, split), f"HF dataset '{name}'", name
    else:
        path = _existing_file(source)
        delimiter = _delimiter(path, format)
        rows = _table_rows(path, delimiter, columns) if delimiter else _json_rows(path)
        origin, task = str(path), _stem(path)
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        raise DataError(f"data file is empty: {origin}")
    chosen = _choose_format(format, first[1], columns)
    converted = _CONVERTERS[chosen](_chain(first, rows), columns)
    records = []
    for index, record in enumerate(islice(converted, limit)):
        record.setdefault("id", f"{task}-{index}")
        record.setdefault("task", task)
        record.setdefault("domain", domain or "general")
        records.append(record)
    if not records:
        raise DataError(f"no usable records in {origin} (format {chosen}); check the file or pass format=")
    return records


def guess_format(row: dict) -> str:
    """The format whose keys a raw row has (``"jsonl"``: generic columns)."""
    keys = set(row)
    if "message_tree_id" in keys and isinstance(row.get("prompt"), dict):
        return "oasst"
    if {"message_id", "parent_id", "role", "text"} <= keys:
        return "oasst"
    if "conversations" in keys:
        return "sharegpt"
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str) and HUMAN in chosen and ASSISTANT in chosen:
        return "hh_rlhf"
    if {"instruction", "context", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return "jsonl"


def _choose_format(format: str | None, first_row: dict, columns: dict | None) -> str:
    """The converter to use: explicit, implied by ``columns=``, or guessed from the first row."""
    if format in MAPPED_FORMATS or (format in (None, "hf") and columns):
        return "mapped"
    if format in (None, "hf"):
        guessed = guess_format(first_row)
        return "mapped" if guessed == "jsonl" else guessed
    if columns:
        raise DataError(f"columns= applies to jsonl/csv/tsv/hf data, not to format {format!r}; drop it")
    return format


_CONVERTERS: dict[str, Callable[[Iterator[Row], Any], Iterator[dict]]] = {
    "alpaca": _row_by_row(_alpaca),
    "dolly": _row_by_row(_dolly),
    "sharegpt": _row_by_row(_sharegpt),
    "hh_rlhf": _row_by_row(_hh_rlhf),
    "oasst": _oasst,
    "mapped": _mapped,
}
