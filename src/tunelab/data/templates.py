"""Prompt and chat templates: how a record becomes the text a causal LM reads.

A template turns a conversation into text made of *segments* ``(text, trainable)``. The collators
tokenize segment by segment, so the loss mask follows the template exactly: a token is trained only
when it comes from an assistant turn (the response). Everything else (system text, user turns, role
headers) is context.

Templates (``TEMPLATES``):

- ``"plain"`` — tunelab's default, the most compact, and the layout of the task documents in the
  built-in pretraining corpus (``prompt + "\\n" + response``), so a tiny model pretrained there already
  knows where a response starts::

      {system}\\n                        (only when there is a system message)
      {prompt}\\n{response}

  A conversation with more than one user turn gets role tags instead:
  ``User: {text}\\nAssistant: {text}\\nUser: {text}\\nAssistant: {text}``.
- ``"alpaca"`` — the Stanford Alpaca template (Taori et al., 2023), with the "paired with an input"
  preamble and a ``### Input:`` section when the record has a non-empty ``input`` (Alpaca) or
  ``context`` (Dolly). A system message replaces the preamble.
- ``"chatml"`` — ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn; the closing ``<|im_end|>`` of
  an assistant turn is trained, so the model learns to end its turn.
- ``"auto"`` — the tokenizer's own ``chat_template`` through ``tokenizer.apply_chat_template``; the
  trainable part of each assistant turn is found by rendering the conversation prefix by prefix. Falls
  back to ``"plain"`` when the tokenizer has no chat template.
- ``"none"`` — the record's ``prompt`` and ``response`` verbatim (data that is already rendered, such
  as HH-RLHF transcripts).

Assistant text is stripped of surrounding whitespace in every template but ``"none"``, so the
template's own newline is the only separator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.errors import ConfigError, DataError

TEMPLATES = ("plain", "alpaca", "chatml", "auto", "none")

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)

Segment = tuple[str, bool]  # (text, trainable)
Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class ChatFormat:
    """A string template per role; ``{content}`` is replaced by the message text."""

    system: str
    user: str
    assistant_header: str  # context before the assistant's text (the "generation prompt")
    assistant_end: str  # trained text closing an assistant turn
    turn_separator: str  # context between an assistant turn and the next turn
    preamble: str = ""  # context before the first turn when there is no system message


CHAT_FORMATS: dict[str, ChatFormat] = {
    "plain": ChatFormat(  # one user turn: exactly the corpus layout
        system="{content}\n",
        user="{content}\n",
        assistant_header="",
        assistant_end="",
        turn_separator="\n",
    ),
    "plain_multi_turn": ChatFormat(
        system="{content}\n",
        user="User: {content}\n",
        assistant_header="Assistant: ",
        assistant_end="",
        turn_separator="\n",
    ),
    "alpaca": ChatFormat(
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant_header="### Response:\n",
        assistant_end="",
        turn_separator="\n\n",
        preamble=ALPACA_PREAMBLE + "\n\n",
    ),
    "chatml": ChatFormat(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_header="<|im_start|>assistant\n",
        assistant_end="<|im_end|>",
        turn_separator="\n",
    ),
}


def resolve_template(template: str, tokenizer: Any = None) -> str:
    """The concrete template name: ``"auto"`` becomes ``"plain"`` without a tokenizer chat template."""
    if template not in TEMPLATES:
        raise ConfigError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "auto" and not getattr(tokenizer, "chat_template", None):
        return "plain"
    return template


def history(record: dict) -> list[Message]:
    """The conversation before the response: ``messages`` minus a final assistant turn, or
    ``[system?, user: prompt]`` for a single-turn record."""
    if record.get("messages"):
        messages = list(record["messages"])
        return messages[:-1] if messages[-1]["role"] == "assistant" else messages
    system = record.get("system")
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": _field(record, "prompt")}]


def conversation(record: dict, response: str | None = None) -> list[Message]:
    """The full conversation to train on; ``response`` replaces the final assistant turn (DPO)."""
    messages = record.get("messages")
    if response is None and messages and messages[-1]["role"] == "assistant":
        return list(messages)
    text = _field(record, "response") if response is None else response
    return history(record) + [{"role": "assistant", "content": text}]


def chat_segments(
    messages: list[Message],
    template: str = "plain",
    tokenizer: Any = None,
    add_generation_prompt: bool = False,
) -> list[Segment]:
    """Segments of a conversation; every assistant turn is trainable.

    Args:
        messages: ``[{"role", "content"}]`` with roles system/user/assistant.
        template: one of ``TEMPLATES`` except ``"none"``.
        tokenizer: needed for ``"auto"``.
        add_generation_prompt: end with the assistant header, ready for generation.
    """
    name = resolve_template(template, tokenizer)
    if name == "none":
        raise ConfigError("template 'none' has no chat rendering; use 'plain', 'chatml', 'alpaca' or 'auto'")
    messages = [_clean(message) for message in messages]
    if name == "auto":
        return _merge(_auto_segments(messages, tokenizer, add_generation_prompt))
    if name == "plain" and sum(m["role"] == "user" for m in messages) > 1:
        name = "plain_multi_turn"
    fmt = CHAT_FORMATS[name]
    segments: list[Segment] = []
    if fmt.preamble and not any(m["role"] == "system" for m in messages):
        segments.append((fmt.preamble, False))
    previous_role = None
    for message in messages:
        role, content = message["role"], message["content"]
        if previous_role == "assistant":
            segments.append((fmt.turn_separator, False))
        if role == "assistant":
            segments += [(fmt.assistant_header, False), (content + fmt.assistant_end, True)]
        else:
            segments.append((getattr(fmt, role).replace("{content}", content), False))
        previous_role = role
    if add_generation_prompt:
        if previous_role == "assistant":
            segments.append((fmt.turn_separator, False))
        segments.append((fmt.assistant_header, False))
    return _merge(segments)


def render_chat(
    messages: list[Message],
    template: str = "plain",
    tokenizer: Any = None,
    add_generation_prompt: bool = False,
) -> str:
    """A multi-turn conversation as one string (see :func:`chat_segments`)."""
    return "".join(text for text, _ in chat_segments(messages, template, tokenizer, add_generation_prompt))


def render_prompt(record: dict, template: str = "plain", tokenizer: Any = None) -> str:
    """The text before the response: what a model is given to generate the record's answer."""
    name = resolve_template(template, tokenizer)
    if name == "none":
        return _field(record, "prompt")
    if name == "alpaca" and not record.get("messages") and _alpaca_input(record):
        return _alpaca_with_input(record)
    return render_chat(history(record), name, tokenizer, add_generation_prompt=True)


def record_segments(
    record: dict, template: str = "plain", tokenizer: Any = None, response: str | None = None
) -> list[Segment]:
    """Segments of a record for training: context, then the trainable response(s).

    ``response`` overrides the record's response (the chosen / rejected text of a preference pair).
    """
    name = resolve_template(template, tokenizer)
    if name == "none":
        text = _field(record, "response") if response is None else response
        return [(_field(record, "prompt"), False), (text, True)]
    if name == "alpaca" and not record.get("messages") and _alpaca_input(record):
        text = _field(record, "response") if response is None else response
        return [(_alpaca_with_input(record), False), (text.strip(), True)]
    return chat_segments(conversation(record, response), name, tokenizer)


def _auto_segments(messages: list[Message], tokenizer: Any, add_generation_prompt: bool) -> list[Segment]:
    """Render with the tokenizer's chat template; each assistant turn is the difference between the
    conversation up to that turn and the same prefix with the generation prompt."""
    segments: list[Segment] = []
    done = ""  # text rendered so far
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _apply_chat_template(tokenizer, messages[:index], True) if index else ""
        full = _apply_chat_template(tokenizer, messages[: index + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError(
                "the tokenizer's chat template does not render conversations prefix by prefix, so the "
                "response cannot be located; use template='chatml' or 'plain'"
            )
        segments += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    if messages and (add_generation_prompt or messages[-1]["role"] != "assistant"):
        tail = _apply_chat_template(tokenizer, messages, add_generation_prompt)
        if not tail.startswith(done):
            raise DataError(
                "the tokenizer's chat template is not prefix-stable; use template='chatml' or 'plain'"
            )
        segments.append((tail[len(done) :], False))
    return segments


def _apply_chat_template(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja errors (e.g. "roles must alternate") are data problems here
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"the tokenizer's chat template rejected a conversation ({reason}); use template='chatml' or 'plain'"
        ) from err
    return text


def _alpaca_input(record: dict) -> str:
    value = record.get("input") or record.get("context") or ""
    return value if isinstance(value, str) else ""


def _alpaca_with_input(record: dict) -> str:
    """Stanford Alpaca's prompt for a record that has an input / context."""
    instruction = record.get("instruction") or _field(record, "prompt")
    preamble = record.get("system") or ALPACA_PREAMBLE_WITH_INPUT
    return f"{preamble}\n\n### Instruction:\n{instruction}\n\n### Input:\n{_alpaca_input(record)}\n\n### Response:\n"


def _clean(message: Message) -> Message:
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "user", "assistant") or not isinstance(content, str):
        raise DataError(
            f"bad chat message {str(message)[:80]!r}: need role system/user/assistant and a string content"
        )
    return {"role": role, "content": content.strip() if role == "assistant" else content}


def _merge(segments: list[Segment]) -> list[Segment]:
    """Drop empty texts and join neighbours with the same trainable flag."""
    merged: list[Segment] = []
    for text, trainable in segments:
        if not text:
            continue
        if merged and merged[-1][1] == trainable:
            merged[-1] = (merged[-1][0] + text, trainable)
        else:
            merged.append((text, trainable))
    return merged


def _field(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"record {record.get('id', '?')!r} has no string {key!r} (keys: {keys}); a template needs "
            "prompt/response or messages"
        )
    return value
