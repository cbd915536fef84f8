"""Argument checks shared by ``make_task`` and ``corpus``: one-line ``DataError`` messages."""

from __future__ import annotations

from collections.abc import Sequence

from tunelab.errors import DataError

from .vocab import DOMAINS, SPLITS


def resolve_domains(domain: str | Sequence[str]) -> tuple[str, ...]:
    """``"medical"`` -> ``("medical",)``; ``"all"`` -> every domain; a list is checked item by item."""
    if isinstance(domain, str):
        names = list(DOMAINS) if domain == "all" else [domain]
    else:
        names = list(domain)
    if not names:
        raise DataError(f"no domain given; choose from: {', '.join(DOMAINS)} (or 'all')")
    for name in names:
        if name not in DOMAINS:
            raise DataError(f"unknown domain {name!r}; choose from: {', '.join(DOMAINS)} (or 'all')")
    return tuple(dict.fromkeys(names))  # drop duplicates, keep order


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    return split


def check_count(name: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"{name} must be an int >= 0, got {n!r}")
    return n


def check_choice(what: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise DataError(f"unknown {what} {value!r}; choose from: {', '.join(choices)}")
    return value
