"""File readers: each yields ``(location, raw row)`` pairs for the converters.

One reader per *container*: a JSON list or JSON Lines file (:func:`_json_rows`, located as
``FILE item N`` / ``FILE line N``), a CSV / TSV table (:func:`_table_rows`, ``FILE line N``; with or
without a header line) and a Hugging Face dataset (:func:`_hf_rows`, ``HF dataset 'NAME' row N``).
Any file may be gzipped; a decoding problem (bad gzip, not UTF-8) becomes a one-line
:class:`~tunelab.errors.DataError` via :func:`_guarded`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunelab.data.formats.common import Row, _chain
from tunelab.errors import DataError


def _existing_file(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}; pass a .json/.jsonl/.csv/.tsv file")
    return path


def _suffixes(path: Path) -> list[str]:
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[:-1] if suffixes and suffixes[-1] == ".gz" else suffixes


def _stem(path: Path) -> str:
    name = path.name
    for suffix in reversed(path.suffixes):
        if suffix.lower() in (".gz", ".json", ".jsonl", ".csv", ".tsv", ".txt"):
            name = name[: -len(suffix)]
    return name or path.name


def _delimiter(path: Path, format: str | None) -> str | None:
    """The CSV/TSV delimiter, or None for JSON containers."""
    if format in ("csv", "tsv"):
        return "," if format == "csv" else "\t"
    suffix = (_suffixes(path) or [""])[-1]
    return {".csv": ",", ".tsv": "\t"}.get(suffix)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _guarded(path: Path, reader: Callable[[], Iterator[Row]]) -> Iterator[Row]:
    """Turn decoding errors (bad gzip, not UTF-8) into one-line DataErrors."""
    try:
        yield from reader()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(
            f"cannot read {path}: {str(err).splitlines()[0]}; is it a text (or gzipped text) file?"
        ) from err


def _json_rows(path: Path) -> Iterator[Row]:
    """A JSON list of objects or JSON Lines; rows located as ``item N`` / ``line N``."""

    def read() -> Iterator[Row]:
        with _open_text(path) as handle:
            head = handle.read(1)
            while head and head.isspace():
                head = handle.read(1)
            if head == "[":
                yield from _json_list_rows(path, head + handle.read())
            elif head:
                yield from _jsonl_rows(path, head, handle)

    return _guarded(path, read)


def _json_list_rows(path: Path, text: str) -> Iterator[Row]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg}, column {err.colno})") from err
    for index, item in enumerate(items):
        where = f"{path} item {index}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        yield where, item


def _jsonl_rows(path: Path, head: str, handle: io.TextIOBase) -> Iterator[Row]:
    lines = _chain(head + handle.readline(), handle)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            hint = ""
            if number == 1:  # the whole file may be something else
                hint = (
                    " (a single pretty-printed JSON object is not supported; use a JSON list or JSON Lines)"
                    if head == "{"
                    else " (not JSON; for a table name it .csv/.tsv or pass format='csv'/'tsv')"
                )
            raise DataError(f"{where}: invalid JSON ({err.msg}){hint}") from err
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _table_rows(path: Path, delimiter: str, columns: dict | None) -> Iterator[Row]:
    """CSV/TSV rows as dicts keyed by header names, or by ``"0", "1", ...`` when the mapping uses
    column indices (then the file has no header line)."""
    headerless = bool(columns) and all(_is_index(v) for v in columns.values())

    def read() -> Iterator[Row]:
        with _open_text(path) as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = None
            for cells in reader:
                if not cells or not any(c.strip() for c in cells):
                    continue
                if header is None and not headerless:
                    header = [c.strip() for c in cells]
                    continue
                names = header or [str(i) for i in range(len(cells))]
                where = f"{path} line {reader.line_num}"
                if header and len(cells) != len(header):
                    raise DataError(f"{where}: {len(cells)} fields but the header has {len(header)}")
                yield where, dict(zip(names, cells, strict=False))  # headerless rows may be ragged

    return _guarded(path, read)


def _hf_rows(name: str, split: str | None) -> Iterator[Row]:
    fix = "install `datasets` / check network, or pass a local file"
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"cannot load HF dataset '{name}': the `datasets` package is not installed; {fix}"
        ) from err
    path, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(path, config or None, split=split or "train")
    except Exception as err:  # network, unknown name, unknown split: all user-fixable
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load HF dataset '{name}': {reason}; {fix}") from err
    for index, row in enumerate(dataset):
        yield f"HF dataset '{name}' row {index}", dict(row)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and value.isdigit())
