"""Pieces every reader and converter shares: the located raw row, the row-level error and the
helpers that lift a one-row converter to a stream whose errors name the file and line.

A reader yields ``(location, raw row)`` pairs (:data:`Row`); a converter raises :class:`RowError`
for a bad row, and :func:`_row_by_row` turns that into a :class:`~tunelab.errors.DataError` that
starts with the row's location.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tunelab.errors import DataError

Row = tuple[str, dict]  # (location for error messages, raw row)


class RowError(Exception):
    """A problem with one raw row; :func:`load_records` adds the row's location."""


def _chain(first: Any, rest: Iterable) -> Iterator:
    yield first
    yield from rest


def _row_by_row(
    convert: Callable[[dict], dict | list[dict]],
) -> Callable[[Iterator[Row], Any], Iterator[dict]]:
    """Lift a one-row converter to a stream converter that locates its errors."""

    def stream(rows: Iterator[Row], columns: Any = None) -> Iterator[dict]:
        for where, row in rows:
            try:
                out = convert(row)
            except RowError as err:
                raise DataError(f"{where}: {err}") from None
            yield from out if isinstance(out, list) else [out]

    return stream


def _text(row: dict, key: str, optional: bool = False) -> str:
    """A required non-empty string field (or, when optional, a string that may be empty/absent)."""
    if key not in row or (optional and row[key] is None):
        if optional:
            return ""
        raise RowError(f"missing key {key!r} (keys present: {', '.join(map(str, row)) or 'none'})")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"key {key!r} must be a string, got {type(value).__name__}")
    if not optional and not value.strip():
        raise RowError(f"key {key!r} is empty")
    return value
