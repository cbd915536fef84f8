"""Loaders for real data formats: every file becomes a list of canonical records.

The idea: one reader per *container* (JSON list / JSON Lines, CSV / TSV, a Hugging Face dataset; any
of the files may be gzipped) yields raw rows with their location (``FILE line N``, ``FILE item N``),
and one converter per *format* maps a raw row to the canonical records of ``docs/internals.md``:

============  ===============================================  ==========================
format        raw row                                          record kind
============  ===============================================  ==========================
alpaca        instruction, input, output                       generation
dolly         instruction, context, response, category         generation
oasst         message tree (or the flat oasst1 message table)  chat, one per root-to-leaf
                                                               path ending in an assistant
sharegpt      conversations[{from, value}] (+ chosen/rejected) chat (preference)
hh_rlhf       chosen / rejected full transcripts               preference
jsonl/csv/tsv any columns, mapped with ``columns=``            generation, classification,
                                                               preference, ner or chat
hf            a Hugging Face dataset, converted as above        (by its columns)
============  ===============================================  ==========================

Any malformed row raises :class:`~tunelab.errors.DataError` naming the file, the line (or list item)
and the problem, never a traceback. ``docs/formats.md`` has the full mapping.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from tunelab.data.templates import render_prompt
from tunelab.errors import DataError

__all__ = ["FORMATS", "guess_format", "load_records", "render_prompt"]

FORMATS = ("alpaca", "dolly", "oasst", "sharegpt", "hh_rlhf", "jsonl", "csv", "tsv", "hf")
MAPPED_FORMATS = ("jsonl", "csv", "tsv")  # generic rows + a column mapping
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
}
# record kind -> canonical keys it needs, tried in this order
KIND_KEYS = {
    "preference": ("prompt", "chosen", "rejected"),
    "classification": ("text", "label"),
    "ner": ("tokens", "ner_tags"),
    "generation": ("prompt", "response"),
    "chat": ("messages",),
}
ROLES = {
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

Row = tuple[str, dict]  # (location for error messages, raw row)


class RowError(Exception):
    """A problem with one raw row; :func:`load_records` adds the row's location."""


def load_records(
    source: str | os.PathLike,
    format: str | None = None,
    columns: dict[str, str | int] | None = None,
    split: str | None = None,
    limit: int | None = None,
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

    Returns:
        Records with ``id``, ``kind``, ``task`` (the file stem or dataset name) and ``domain``
        (``"general"``) plus the keys of their kind.
    """
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; valid formats: {', '.join(FORMATS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}")
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
        record.setdefault("domain", "general")
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


# ----------------------------------------------------------------------------- readers


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


def _chain(first: Any, rest: Iterable) -> Iterator:
    yield first
    yield from rest


def _is_index(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and value.isdigit())


# ----------------------------------------------------------------------------- converters


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


def _alpaca(row: dict) -> dict:
    instruction, extra = _text(row, "instruction"), _text(row, "input", optional=True)
    output = _text(row, "output")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    record = {
        "kind": "generation",
        "prompt": prompt,
        "response": output,
        "instruction": instruction,
        "input": extra,
    }
    system = _text(row, "system", optional=True)
    if system.strip():
        record["system"] = system
    return record


def _dolly(row: dict) -> dict:
    instruction, context = _text(row, "instruction"), _text(row, "context", optional=True)
    prompt = f"{instruction}\n\n{context}" if context.strip() else instruction
    return {
        "kind": "generation",
        "prompt": prompt,
        "response": _text(row, "response"),
        "instruction": instruction,
        "context": context,
        "category": _text(row, "category", optional=True),
    }


def _messages(turns: Any, key: str) -> list[dict]:
    """ShareGPT ``{from, value}`` or OpenAI ``{role, content}`` turns as canonical messages."""
    if not isinstance(turns, list) or not turns:
        raise RowError(f"key {key!r} must be a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{key}[{number}] must be an object with from/value or role/content")
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        role = ROLES.get(str(turn.get(role_key)).lower())
        if role is None:
            raise RowError(
                f"{key}[{number}] has unknown role {turn.get(role_key)!r}; "
                "expected human/gpt/system or user/assistant/system"
            )
        text = turn.get(text_key)
        if not isinstance(text, str) or (role != "system" and not text.strip()):
            raise RowError(f"{key}[{number}] ({role}) needs a non-empty string {text_key!r}")
        if role != "system" or text.strip():
            messages.append({"role": role, "content": text})
    return messages


def _transcript(history: list[dict]) -> str:
    """The ``prompt`` field of a conversation: the user's text for one turn, else a transcript."""
    turns = [m for m in history if m["role"] != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def _system_of(messages: list[dict]) -> dict:
    system = [m["content"] for m in messages if m["role"] == "system"]
    return {"system": system[0]} if system else {}


def _chat_record(messages: list[dict]) -> dict:
    """A chat record; trailing non-assistant turns are dropped (nothing to learn from them)."""
    while messages and messages[-1]["role"] != "assistant":
        messages = messages[:-1]
    if not any(m["role"] == "user" for m in messages):
        raise RowError("conversation has no user turn followed by an assistant turn")
    record = {
        "kind": "chat",
        "messages": messages,
        "prompt": _transcript(messages[:-1]),
        "response": messages[-1]["content"],
    }
    return record | _system_of(messages)


def _preference_record(history: list[dict], chosen: str, rejected: str) -> dict:
    if not history or history[-1]["role"] != "user":
        raise RowError("the conversation before chosen/rejected must end with a user turn")
    record = {
        "kind": "preference",
        "prompt": _transcript(history),
        "chosen": chosen,
        "rejected": rejected,
        "messages": history,
    }
    return record | _system_of(history)


def _reply(row: dict, key: str) -> str:
    value = row.get(key)
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if not isinstance(value, str) or not value.strip():
        raise RowError(
            f"key {key!r} must be a non-empty string or a {{from, value}} turn "
            f"(keys present: {', '.join(map(str, row))})"
        )
    return value


def _sharegpt(row: dict) -> dict:
    key = "conversations" if "conversations" in row else "messages"
    if key not in row:
        raise RowError(f"missing key 'conversations' (keys present: {', '.join(map(str, row)) or 'none'})")
    messages = _messages(row[key], key)
    system = _text(row, "system", optional=True)
    if system.strip() and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    if "chosen" in row or "rejected" in row:  # LLaMA-Factory's DPO variant
        return _preference_record(messages, _reply(row, "chosen"), _reply(row, "rejected"))
    return _chat_record(messages)


def _hh_rlhf(row: dict) -> dict:
    """Prompt = the shared prefix up to and including its last ``\\n\\nAssistant:``; chosen/rejected =
    the rest of each transcript, verbatim (so ``prompt + chosen`` is the original text)."""
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise RowError(f"chosen and rejected share no {ASSISTANT!r} turn; not an HH-RLHF pair")
    prompt = chosen[: cut + len(ASSISTANT)]
    pieces = re.split(r"\n\n(Human|Assistant):", prompt)  # ["", role, text, role, text, ...]
    history = [
        {"role": "user" if role == "Human" else "assistant", "content": text.strip()}
        for role, text in zip(pieces[1::2], pieces[2::2], strict=True)
    ][:-1]  # drop the open final turn
    return {
        "kind": "preference",
        "prompt": prompt,
        "chosen": chosen[len(prompt) :],
        "rejected": rejected[len(prompt) :],
        "messages": history,
    }


def _oasst_tree(row: dict) -> list[dict]:
    """Every root-to-leaf path of a message tree that ends in an assistant message."""
    root = row.get("prompt")
    if not isinstance(root, dict):
        raise RowError(
            f"key 'prompt' must be the tree's root message (keys present: {', '.join(map(str, row))})"
        )
    tree_id = str(row.get("message_tree_id", root.get("message_id", "")))
    records = []
    stack = [(root, [])]  # (node, messages above it)
    while stack:
        node, above = stack.pop()
        if node.get("deleted") is True or node.get("review_result") is False:
            continue  # OASST's own filter: removed or rejected by reviewers
        path = above + [_oasst_message(node)]
        replies = node.get("replies") or []
        if not replies and path[-1]["role"] == "assistant":
            record = _chat_record(path)
            record.update(
                id=str(node.get("message_id", f"{tree_id}-{len(records)}")),
                message_tree_id=tree_id,
                lang=root.get("lang", ""),
            )
            records.append(record)
        stack.extend((reply, path) for reply in reversed(replies))  # depth-first, in reply order
    return records


def _oasst_message(node: dict) -> dict:
    role = {"prompter": "user", "assistant": "assistant"}.get(node.get("role"))
    text = node.get("text")
    if role is None or not isinstance(text, str) or not text.strip():
        raise RowError(
            f"message {node.get('message_id', '?')!r} needs role prompter/assistant and a "
            f"non-empty text (keys present: {', '.join(map(str, node))})"
        )
    return {"role": role, "content": text}


def _oasst(rows: Iterator[Row], columns: Any = None) -> Iterator[dict]:
    """Trees (one per line) stream; the flat oasst1 message table is first assembled into trees."""
    first = next(rows)
    rows = _chain(first, rows)
    if "message_tree_id" in first[1] and isinstance(first[1].get("prompt"), dict):
        yield from _row_by_row(_oasst_tree)(rows)
        return
    for where, tree in _assemble_trees(rows):
        try:
            yield from _oasst_tree(tree)
        except RowError as err:
            raise DataError(f"{where}: {err}") from None


def _assemble_trees(rows: Iterator[Row]) -> list[tuple[str, dict]]:
    """Flat ``message_id, parent_id, role, text`` rows -> ``(location of root, tree row)``."""
    nodes: dict[str, dict] = {}
    order: list[tuple[str, dict]] = []
    for where, row in rows:
        for key in ("message_id", "role", "text"):
            if key not in row:
                raise DataError(f"{where}: missing key {key!r} (keys present: {', '.join(map(str, row))})")
        node = dict(row, replies=[])
        nodes[str(row["message_id"])] = node
        order.append((where, node))
    roots = []
    for where, node in order:
        parent = node.get("parent_id")
        if parent is None or parent == "":
            roots.append(
                (where, {"message_tree_id": node.get("message_tree_id", node["message_id"]), "prompt": node})
            )
        elif str(parent) in nodes:
            nodes[str(parent)]["replies"].append(node)
        else:
            raise DataError(f"{where}: parent_id {parent!r} is not in the file; include whole message trees")
    return roots


def _mapped(rows: Iterator[Row], columns: dict | None) -> Iterator[dict]:
    """Generic rows: ``columns`` (or the alias table) maps canonical keys to source columns."""
    first = next(rows)
    mapping = _column_mapping(first, columns)
    kind = _kind_of(mapping, first[0])
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
        return {key: str(value) for key, value in columns.items()}
    mapping = {}
    for key, aliases in COLUMN_ALIASES.items():
        found = next((alias for alias in aliases if alias in row), None)
        if found is not None:
            mapping[key] = found
    return mapping


def _kind_of(mapping: dict[str, str], where: str) -> str:
    for kind, keys in KIND_KEYS.items():
        if all(key in mapping for key in keys):
            return kind
    origin = where.rsplit(" line ", 1)[0].rsplit(" item ", 1)[0].rsplit(" row ", 1)[0]
    raise DataError(
        f"cannot tell which columns of {origin} hold the data (mapped: {mapping or 'nothing'}); pass "
        "columns={'prompt': ..., 'response': ...} or {'text': ..., 'label': ...} (indices for a headerless TSV)"
    )


def _mapped_record(row: dict, mapping: dict[str, str], kind: str) -> dict:
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
    if kind == "ner":
        return _ner_record(values["tokens"], values["ner_tags"])
    if kind == "chat":
        return _chat_record(_messages(values["messages"], mapping["messages"]))
    record = {"kind": kind}
    for key in KIND_KEYS[kind] + (("system",) if "system" in values else ()):
        record[key] = _text(
            {mapping[key]: values[key]}, mapping[key], optional=key in ("system", "chosen", "rejected")
        )
    return record


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


_CONVERTERS: dict[str, Callable[[Iterator[Row], Any], Iterator[dict]]] = {
    "alpaca": _row_by_row(_alpaca),
    "dolly": _row_by_row(_dolly),
    "sharegpt": _row_by_row(_sharegpt),
    "hh_rlhf": _row_by_row(_hh_rlhf),
    "oasst": _oasst,
    "mapped": _mapped,
}
