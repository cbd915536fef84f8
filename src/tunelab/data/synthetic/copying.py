"""Pretraining documents that can only be predicted by copying from earlier in the document.

Why: the world has 160 training entities per domain, each with fixed attribute values, so a model
pretrained on documents about them learns the answers *by heart* ("Belmar → fishing") and never needs
to read its context. Fine-tuned on held-out entities, it then answers with a value of the right type
but not the one in the note. Here every document is about **fresh entities**, invented for that
document (new names, random attribute values), so the values after "Question: ..." or in a summary
are unpredictable unless they are copied from the note above; this is the pressure that grows
induction ("copy what followed the last match") heads. Two kinds of documents:

- **task documents about fresh entities** of the pretraining domain: the same renderers as
  :mod:`.tasks` (summarization, extractive QA, NER, translation), and an encyclopedic paragraph
  followed by closed-book questions about it ("facts restated within a document");
- **key-value records**: ``Record: colour: amber; code: 4172; ...`` then questions that look keys up,
  or a list recalled in order, over random words and numbers (copying any token, not only names).

Fresh names come from the domain's syllables but never repeat a word of the world's own entities, so
held-out perplexity and held-out tasks stay about entities the model never saw.
"""

from __future__ import annotations

import random

from . import vocab
from .render import encyclopedia
from .tasks import RENDERERS, Context
from .world import Entity, World, _Namer, _reserved_tokens

FRESH_KINDS: dict[str, float] = {  # reading-heavy: extractive QA and summaries are what fine-tuning asks
    "summarization": 0.18, "extractive_qa": 0.28, "recall": 0.16, "ner": 0.02, "translation": 0.02,
    "records": 0.16, "echo": 0.18,
}
ENTITIES_PER_DOCUMENT = 3  # a document's examples are about a few fresh entities, so a name is a key
MIN_WORDS = 50

KEYS = ("code", "colour", "owner", "city", "size", "price", "room", "date", "level", "tag", "route",
        "shelf", "batch", "team", "model", "port")
COLOURS = ("amber", "blue", "crimson", "green", "grey", "indigo", "ivory", "olive", "orange", "pink",
           "silver", "teal", "violet", "white", "yellow", "black")
UNITS = ("mg", "kg", "km", "ml", "cm", "g", "h", "min")


class FreshWorld:
    """Invents entities of one world's domains that are not in that world (names never reused)."""

    def __init__(self, world: World, rng: random.Random) -> None:
        reserved = _reserved_tokens()
        for entities in world.entities.values():
            for entity in entities:
                reserved.update(entity.values()["name"].split())
                for value in entity.attributes.values():
                    reserved.update(value.split())
        self.world, self.rng = world, rng
        self.namer = _Namer(rng, reserved)

    def entity(self, domain: str) -> Entity:
        return self.world.invent_entity(domain, self.namer, self.rng)

    def word(self) -> str:
        """A fresh capitalised word from any domain's syllables."""
        return self.namer.word(vocab.NAME_SYLLABLES[self.rng.choice(vocab.DOMAINS)])


def _value(fresh: FreshWorld, key: str) -> str:
    rng = fresh.rng
    if key == "colour":
        return rng.choice(COLOURS)
    if key in ("owner", "team"):
        return fresh.namer.person()
    if key in ("city", "port", "model", "route", "tag"):
        return fresh.word()
    if key == "date":
        return str(rng.randint(1100, 2030))
    if key in ("size", "price"):
        return f"{rng.choice((1, 2, 5, 10, 20, 25, 40, 50, 75, 100, 150, 200, 300, 500, 800))} {rng.choice(UNITS)}"
    return str(rng.randint(1, 9999))


def _records_document(fresh: FreshWorld) -> str:
    """A key-value record, then questions looking keys up (or the values recalled in order)."""
    rng = fresh.rng
    keys = rng.sample(KEYS, rng.randint(3, 6))
    values = {key: _value(fresh, key) for key in keys}
    name = fresh.word()
    lines = [f"Record of {name}: " + "; ".join(f"{k}: {v}" for k, v in values.items()) + "."]
    if rng.random() < 0.25:
        lines.append(f"Repeat the values of {name}:\n" + " | ".join(values.values()))
    else:
        for key in rng.sample(keys, min(len(keys), rng.randint(2, 4))):
            lines.append(f"Question: What is the {key} of {name}?\nAnswer: {values[key]}")
    return "\n".join(lines)


def _echo_document(fresh: FreshWorld) -> str:
    """Lists of random words and numbers, each repeated once: every repeated token is copyable."""
    rng, lines = fresh.rng, []
    while sum(len(line.split()) for line in lines) < MIN_WORDS:
        items = [_value(fresh, rng.choice(KEYS)) for _ in range(rng.randint(3, 8))]
        lines.append("List: " + ", ".join(items) + ".\nThe list again: " + ", ".join(items) + ".")
    return "\n".join(lines)


def _recall_document(ctx: Context) -> str:
    """Encyclopedic paragraphs about fresh entities, then closed-book questions answered from them."""
    paragraphs = [encyclopedia(entity, ctx.rng, min_words=20) for entity in ctx.entities]
    questions = [_render(RENDERERS["qa"], ctx) for _ in range(ctx.rng.randint(3, 5))]
    return "\n\n".join(["\n".join(paragraphs), *questions])


def _render(renderer, ctx: Context) -> str:
    record = renderer(ctx)
    return f"{record['prompt']}\n{record['response']}"


def copying_document(fresh: FreshWorld, domain: str, kind: str) -> str:
    """One document of ``kind`` (a key of :data:`FRESH_KINDS`) about fresh entities of ``domain``."""
    if kind == "records":
        return _records_document(fresh)
    if kind == "echo":
        return _echo_document(fresh)
    entities = tuple(fresh.entity(domain) for _ in range(ENTITIES_PER_DOCUMENT))
    ctx = Context(fresh.world, domain, entities, fresh.rng)
    if kind == "recall":
        return _recall_document(ctx)
    examples, words = [], 0
    while words < MIN_WORDS:
        text = _render(RENDERERS[kind], ctx)
        examples.append(text)
        words += len(text.split())
    return "\n\n".join(examples)


def copying_corpus(world: World, domain: str, n_documents: int, seed: int) -> list[str]:
    """``n_documents`` copy-rewarding documents about fresh entities of ``domain`` (see the module doc)."""
    rng = random.Random(f"copying|{seed}|{domain}")
    fresh = FreshWorld(world, rng)
    kinds, weights = list(FRESH_KINDS), list(FRESH_KINDS.values())
    return [copying_document(fresh, domain, rng.choices(kinds, weights)[0]) for _ in range(n_documents)]
