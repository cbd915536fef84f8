"""Conversation helpers shared by the chat, preference and column-mapped converters.

Turns in either ShareGPT (``{from, value}``) or OpenAI (``{role, content}``) shape become canonical
``{role, content}`` messages (:data:`ROLES` maps the role names); :func:`_chat_record` makes a
``chat`` record whose ``prompt`` is the conversation before the last assistant turn, rendered by
:func:`_transcript`, and whose ``response`` is that turn.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.formats.common import RowError

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
