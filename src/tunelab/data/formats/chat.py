"""Chat formats: ShareGPT conversations (and LLaMA-Factory's DPO variant with ``chosen`` /
``rejected``) and OpenAssistant (OASST) message trees.

A ShareGPT row is one ``chat`` record (or one ``preference`` record). An OASST tree gives one ``chat``
record per root-to-leaf path that ends in an assistant message; trees come one per line, or as the
flat oasst1 message table (``message_id, parent_id, role, text``), which is assembled into trees first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tunelab.data.formats.common import Row, RowError, _chain, _row_by_row, _text
from tunelab.data.formats.messages import _chat_record, _messages
from tunelab.data.formats.preference import _preference_record
from tunelab.errors import DataError


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
