"""Instruction formats: Alpaca (``instruction, input, output``, optional ``system``) and Dolly
(``instruction, context, response, category``), each row one ``generation`` record.

The prompt is the instruction, followed by a blank line and the input / context when there is one;
the original fields are kept on the record so templates (e.g. ``alpaca``) can lay them out again.
"""

from __future__ import annotations

from tunelab.data.formats.common import _text


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
