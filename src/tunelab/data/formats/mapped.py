"""Column-mapped generic rows (``jsonl`` / ``csv`` / ``tsv``, and ``hf`` with ``columns=``).

``columns=`` (or, without it, the first matching name of :data:`COLUMN_ALIASES`) maps canonical keys
to source columns; the mapped keys decide the record kind (:data:`KIND_KEYS`, first match wins):
preference, unpaired (KTO's ``prompt`` / ``completion`` / ``label`` = desirable or not), classification,
NER (``tokens`` + ``ner_tags``, rendered like the built-in NER task), generation or chat. A ``domain``
column, when the file has one, becomes each record's ``domain``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tunelab.data.formats.common import Row, RowError, _chain, _row_by_row, _text
from tunelab.data.formats.messages import _chat_record, _messages
from tunelab.errors import DataError

# canonical key -> column names tried, in order, when no ``columns=`` mapping is given
COLUMN_ALIASES = {
    "prompt": ("prompt", "question", "query"),
    "response": ("response", "answer", "completion"),
    "text": ("text", "sentence"),
    "label": ("label",),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
    "system": ("system",),
    "tokens": ("tokens",),
    "ner_tags": ("ner_tags",),
    "messages": ("messages",),
    "completion": ("completion",),
    "domain": ("domain",),
}
# record kind -> canonical keys it needs, tried in this order
KIND_KEYS = {
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),  # KTO feedback: label = is the completion desirable
    "classification": ("text", "label"),
    "ner": ("tokens", "ner_tags"),
    "generation": ("prompt", "response"),
    "chat": ("messages",),
}


def _mapped(rows: Iterator[Row], columns: dict | None) -> Iterator[dict]:
    """Generic rows: ``columns`` (or the alias table) maps canonical keys to source columns."""
    first = next(rows)
    mapping = _column_mapping(first, columns)
    kind = _kind_of(mapping, first[0], first[1])
    convert = _row_by_row(lambda row: _mapped_record(row, mapping, kind))
    yield from convert(_chain(first, rows))


def _column_mapping(first: Row, columns: dict | None) -> dict[str, str]:
    where, row = first
    if columns:
        unknown = sorted(set(columns) - set(COLUMN_ALIASES))
        if unknown:
            raise DataError(
                f"unknown canonical key(s) {unknown} in columns=; valid keys: {', '.join(COLUMN_ALIASES)}"
            )
        mapping = {key: str(value) for key, value in columns.items()}
        if "domain" not in mapping and "domain" in row:
            mapping["domain"] = "domain"  # a domain column is kept whatever else is mapped
        return mapping
    mapping = {}
    for key, aliases in COLUMN_ALIASES.items():
        found = next((alias for alias in aliases if alias in row), None)
        if found is not None:
            mapping[key] = found
    return mapping


def _kind_of(mapping: dict[str, str], where: str, row: dict | None = None) -> str:
    for kind, keys in KIND_KEYS.items():
        if all(key in mapping for key in keys):
            return kind
    origin = where.rsplit(" line ", 1)[0].rsplit(" item ", 1)[0].rsplit(" row ", 1)[0]
    present = f"; its columns are: {', '.join(map(str, row))}" if row else ""
    raise DataError(
        f"cannot tell which columns of {origin} hold the data (mapped: {mapping or 'nothing'}{present}); pass "
        "columns={'prompt': ..., 'response': ...}, {'text': ..., 'label': ...} or, for preference pairs, "
        "{'prompt': ..., 'chosen': ..., 'rejected': ...} (indices for a headerless TSV)"
    )


# how a KTO label may be written -> desirable?
DESIRABLE_LABELS = {"true": True, "false": False, "1": True, "0": False, "desirable": True, "undesirable": False}


def desirable_label(value: Any) -> bool:
    """A KTO label as a bool: true/false, 1/0, or the strings "true"/"false"/"1"/"0"/"desirable"/"undesirable"
    (any case); ValueError naming the accepted values for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in DESIRABLE_LABELS:
        return DESIRABLE_LABELS[value.strip().lower()]
    raise ValueError(f"label {value!r} is not a KTO label; use true/false, 1/0 or \"desirable\"/\"undesirable\"")


def _mapped_record(row: dict, mapping: dict[str, str], kind: str) -> dict:
    domain = _domain(row, mapping.get("domain"))
    record = _kind_record(row, {k: v for k, v in mapping.items() if k != "domain"}, kind)
    if domain is not None:
        record["domain"] = domain
    return record


def _domain(row: dict, column: str | None) -> str | None:
    """The row's ``domain`` column (None when the file has none or this row leaves it empty)."""
    value = row.get(column) if column is not None else None
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise RowError(f"column {column!r} (domain) must be a non-empty name, got {value!r}")
    return str(value).strip()


def _kind_record(row: dict, mapping: dict[str, str], kind: str) -> dict:
    values = {}
    for key, column in mapping.items():
        if column not in row:
            raise RowError(
                f"missing column {column!r} for {key!r} (keys present: {', '.join(map(str, row))})"
            )
        values[key] = row[column]
    if kind == "classification":
        label = values["label"]
        if label is None or isinstance(label, (dict, list)) or not str(label).strip():
            raise RowError(f"column {mapping['label']!r} (label) must be a non-empty string or number")
        text = _text({mapping["text"]: values["text"]}, mapping["text"])
        return {
            "kind": kind,
            "text": text,
            "label": str(label).strip(),
            "prompt": text,
            "response": str(label).strip(),
        }
    if kind == "unpaired":
        try:
            label = desirable_label(values["label"])
        except ValueError as error:
            raise RowError(f"column {mapping['label']!r}: {error}") from None
        record = {"kind": kind, "prompt": _text({mapping["prompt"]: values["prompt"]}, mapping["prompt"]),
                  "completion": _text({mapping["completion"]: values["completion"]}, mapping["completion"], optional=True),
                  "label": label}
        if "system" in values:
            record["system"] = _text({mapping["system"]: values["system"]}, mapping["system"], optional=True)
        return record
    if kind == "ner":
        return _ner_record(values["tokens"], values["ner_tags"])
    if kind == "chat":
        return _chat_record(_messages(values["messages"], mapping["messages"]))
    record: dict[str, Any] = {"kind": kind}
    if kind == "generation" and _is_text_list(values["response"]) and values["response"]:
        record["references"] = [str(text) for text in values["response"]]  # several acceptable answers
        values["response"] = values["response"][0]
    for key in KIND_KEYS[kind] + (("system",) if "system" in values else ()):
        value = values[key]
        if _is_text_list(value):  # e.g. SciTLDR's source: a list of sentences
            value = "\n".join(str(text) for text in value)
        record[key] = _text({mapping[key]: value}, mapping[key], optional=key in ("system", "chosen", "rejected"))
    return record


def _is_text_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value)


def _ner_record(tokens: Any, tags: Any) -> dict:
    """Prompt and response as the built-in NER task renders them: ``mention [TYPE]; ...``."""
    tokens = tokens.split() if isinstance(tokens, str) else tokens
    tags = tags.split() if isinstance(tags, str) else tags
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise RowError("tokens must be a non-empty list of strings")
    if not isinstance(tags, list) or len(tags) != len(tokens):
        raise RowError(f"ner_tags must be a list as long as tokens ({len(tokens)})")
    tags = [str(tag) for tag in tags]
    mentions: list[list[str]] = []  # [words..., TYPE]
    for token, tag in zip(tokens, tags, strict=True):
        if tag.startswith("I-") and mentions and mentions[-1][-1] == tag[2:]:
            mentions[-1].insert(-1, token)
        elif tag != "O":
            mentions.append([token, tag.split("-", 1)[-1]])
    response = "; ".join(f"{' '.join(m[:-1])} [{m[-1]}]" for m in mentions)
    return {
        "kind": "ner",
        "tokens": tokens,
        "ner_tags": tags,
        "prompt": f"Tag the entities: {' '.join(tokens)}",
        "response": response or "none",
    }
