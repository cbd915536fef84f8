"""Preference data: HH-RLHF ``chosen`` / ``rejected`` transcript pairs, and the ``preference``
record that the ShareGPT DPO variant shares.

An HH-RLHF pair is two full ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcripts; the prompt is their
shared prefix up to the last ``\\n\\nAssistant:``, and chosen / rejected are the two continuations.
"""

from __future__ import annotations

import os
import re

from tunelab.data.formats.common import RowError, _text
from tunelab.data.formats.messages import _system_of, _transcript

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


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
