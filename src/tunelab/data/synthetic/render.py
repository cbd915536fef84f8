"""Turning entities into text: template filling with character spans, notes, summaries.

``fill`` replaces ``{slot}`` placeholders and records where each value landed, which is how extractive
QA gets exact ``answer_start`` offsets without searching the text. A *note* is a few sentences about
one entity, one per attribute (random phrasing, schema order), with distractor sentences about other
things inserted at random places; its *summary* is the fixed template ``name | a1 | a2 | a3 | a4``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

from . import vocab
from .templates import BACKGROUND, DISTRACTORS, NOTE
from .world import Entity

_SLOT = re.compile(r"\{(\w+)\}")


def fill(template: str, values: Mapping[str, str]) -> tuple[str, dict[str, int]]:
    """Fill ``{slot}`` placeholders.

    Returns:
        ``(text, starts)`` where ``starts[slot]`` is the character offset of the slot's first value.
    """
    parts: list[str] = []
    starts: dict[str, int] = {}
    length, last = 0, 0
    for match in _SLOT.finditer(template):
        literal = template[last:match.start()]
        parts.append(literal)
        length += len(literal)
        slot = match.group(1)
        starts.setdefault(slot, length)
        parts.append(values[slot])
        length += len(values[slot])
        last = match.end()
    parts.append(template[last:])
    return "".join(parts), starts


def sentence(entity: Entity, attribute: str, rng: random.Random) -> tuple[str, int]:
    """One note sentence stating ``attribute``; returns ``(text, start of the value)``."""
    template = rng.choice(NOTE[entity.domain][attribute])
    text, starts = fill(template, entity.values())
    return text, starts[attribute]


def note(
    entity: Entity, attributes: Sequence[str], rng: random.Random, n_distractors: int
) -> tuple[str, dict[str, int]]:
    """A note: one sentence per attribute (in the given order) plus distractors at random positions.

    Returns:
        ``(text, starts)`` with the character offset of each attribute's value in ``text``.
    """
    pieces: list[tuple[str | None, str, int]] = []  # (attribute or None, sentence, value offset)
    for attribute in attributes:
        text, start = sentence(entity, attribute, rng)
        pieces.append((attribute, text, start))
    for distractor in rng.sample(DISTRACTORS[entity.domain], n_distractors):
        pieces.insert(rng.randint(0, len(pieces)), (None, distractor, 0))
    texts, starts, offset = [], {}, 0
    for attribute, text, start in pieces:
        if attribute is not None:
            starts[attribute] = offset + start
        texts.append(text)
        offset += len(text) + 1  # +1: the joining space
    return " ".join(texts), starts


def summary(entity: Entity) -> str:
    """The fixed-form summary ``name | a1 | a2 | a3 | a4`` (``vocab.SUMMARY_ATTRIBUTES`` order)."""
    fields = [entity.name] + [entity.attributes[a] for a in vocab.SUMMARY_ATTRIBUTES[entity.domain]]
    return " | ".join(fields)


def attribute_names(domain: str) -> tuple[str, ...]:
    """The domain's attributes in schema order."""
    return tuple(a.name for a in vocab.ATTRIBUTES[domain])


def encyclopedia(entity: Entity, rng: random.Random, min_words: int = 50) -> str:
    """An encyclopedic paragraph: every attribute, then background sentences up to ``min_words``."""
    text, _ = note(entity, attribute_names(entity.domain), rng, n_distractors=0)
    sentences = [text]
    background = list(BACKGROUND[entity.domain])
    rng.shuffle(background)
    words = len(text.split())
    for i, template in enumerate(background):
        if words >= min_words and i >= 1:  # always at least one background sentence, for variety
            break
        extra, _ = fill(template, entity.values())
        sentences.append(extra)
        words += len(extra.split())
    return " ".join(sentences)
