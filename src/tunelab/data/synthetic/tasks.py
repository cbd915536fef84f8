"""Rendering the world into task records: generation, understanding and preference.

Each task has a *renderer* ``(Context) -> dict`` that draws one entity from the context's pool and
writes one record (without ``id``/``task``/``domain``/``kind``, which ``make_task`` adds). The same
renderers feed :func:`make_task` and the pretraining corpus, so the formats match exactly.

Prompt formats are shared across domains (a model that learns "Summarize the note:" on the general
domain meets the same instruction on the medical one):

- ``qa``: ``What is the usual dose of Zelvorin?`` -> ``40 mg``
- ``summarization``: ``Summarize the note: <note with distractors>`` -> ``Zelvorin | antiviral | ...``
- ``translation``: ``Translate to Zemish: <sentence>`` -> ``<Zemish sentence>``
- ``domain_classification``: ``Classify the domain: <two sentences>`` -> ``medical``
- ``urgency``: ``Classify the urgency: <report + one sentence>`` -> ``low`` / ``medium`` / ``high``
- ``extractive_qa``: ``Answer from the context.\\nContext: ...\\nQuestion: ...`` -> the answer span
- ``ner``: ``Tag the entities: <tokens joined by spaces>`` -> ``Zelvorin [DRUG]; migraine [CONDITION]``
- ``preference``: a summarization or extractive_qa prompt -> ``chosen`` / ``rejected``

Splits hold out entities (the ``Context`` pool is the split's entities), except closed-book ``qa``:
facts must be memorised, so every split asks about all entities and holds out question *phrasings*
(``templates.QA_TEMPLATE_SPLITS``). Every other task, and the corpus, uses only the train phrasings, so
the held-out phrasings appear nowhere but in qa validation/test.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tunelab.errors import DataError

from . import vocab
from .checks import check_choice, check_count, check_split, resolve_domains
from .render import attribute_names, fill, note, sentence, summary
from .templates import DISTRACTORS, NER, QA_TEMPLATE_SPLITS, QUESTIONS, TRANSLATION, URGENCY
from .translate import LANGUAGE
from .world import Entity, World, default_world


@dataclass
class Context:
    """What a renderer draws from: the world, one domain, an entity pool, a random stream."""

    world: World
    domain: str
    entities: tuple[Entity, ...]
    rng: random.Random
    phrasing: str = "train"  # which QA_TEMPLATE_SPLITS phrasings closed-book qa may use

    def pick(self) -> Entity:
        return self.rng.choice(self.entities)


def _question(entity: Entity, attribute: str, index: int) -> str:
    return fill(QUESTIONS[entity.domain][attribute][index], entity.values())[0]


def _extractive(ctx: Context, entity: Entity) -> tuple[str, str, str, int]:
    """A short context (3 attribute sentences + 1 distractor) and a question about one attribute.

    Returns:
        ``(prompt, attribute, context, answer_start)``.
    """
    names = attribute_names(ctx.domain)
    attribute = ctx.rng.choice(names)
    shown = {attribute, *ctx.rng.sample([a for a in names if a != attribute], 2)}
    context, starts = note(entity, [a for a in names if a in shown], ctx.rng, n_distractors=1)
    question = _question(entity, attribute, ctx.rng.choice(QA_TEMPLATE_SPLITS["train"]))
    prompt = f"Answer from the context.\nContext: {context}\nQuestion: {question}"
    return prompt, attribute, context, starts[attribute]


def _wrong_value(world: World, entity: Entity, attribute: str, rng: random.Random) -> str:
    """A plausible wrong answer: another value of the same attribute (so of the same type)."""
    correct = entity.attributes[attribute]
    candidates = [v for v in world.values(entity.domain, attribute) if v != correct]
    return rng.choice(candidates)


# ------------------------------------------------------------------------------------- generation
def render_qa(ctx: Context) -> dict:
    entity = ctx.pick()
    attribute = ctx.rng.choice(attribute_names(ctx.domain))
    index = ctx.rng.choice(QA_TEMPLATE_SPLITS[ctx.phrasing])
    return {"prompt": _question(entity, attribute, index), "response": entity.attributes[attribute],
            "entity": entity.name, "attribute": attribute, "template": index}


def render_summarization(ctx: Context) -> dict:
    entity = ctx.pick()
    text, _ = note(entity, attribute_names(ctx.domain), ctx.rng, n_distractors=ctx.rng.randint(1, 2))
    return {"prompt": f"Summarize the note: {text}", "response": summary(entity), "entity": entity.name}


def render_translation(ctx: Context) -> dict:
    entity = ctx.pick()
    source, _ = fill(ctx.rng.choice(TRANSLATION[ctx.domain]), entity.values())
    return {"prompt": f"Translate to {LANGUAGE}: {source}", "response": ctx.world.translator.translate(source),
            "source": source, "entity": entity.name}


# ---------------------------------------------------------------------------------- understanding
def render_domain_classification(ctx: Context) -> dict:
    entity = ctx.pick()
    attributes = ctx.rng.sample(attribute_names(ctx.domain), 2)
    text = " ".join(sentence(entity, a, ctx.rng)[0] for a in attributes)
    return {"text": text, "label": ctx.domain, "prompt": f"Classify the domain: {text}",
            "response": ctx.domain, "entity": entity.name}


def render_urgency(ctx: Context) -> dict:
    """A report whose one cue word (``vocab.URGENCY_CUES``) decides the label, plus one other sentence."""
    entity, rng = ctx.pick(), ctx.rng
    label = rng.choice(vocab.URGENCY_LABELS)
    slots = {"name": entity.name, "cue": rng.choice(vocab.URGENCY_CUES[ctx.domain][label]),
             "event": rng.choice(vocab.URGENCY_EVENTS[ctx.domain])}
    report, _ = fill(rng.choice(URGENCY[ctx.domain]), slots)
    if rng.random() < 0.5:
        other = sentence(entity, rng.choice(attribute_names(ctx.domain)), rng)[0]
    else:
        other = rng.choice(DISTRACTORS[ctx.domain])
    text = f"{report} {other}" if rng.random() < 0.5 else f"{other} {report}"
    return {"text": text, "label": label, "prompt": f"Classify the urgency: {text}", "response": label,
            "entity": entity.name}


def render_extractive_qa(ctx: Context) -> dict:
    entity = ctx.pick()
    prompt, attribute, context, start = _extractive(ctx, entity)
    answer = entity.attributes[attribute]
    question = prompt.rsplit("\nQuestion: ", 1)[1]
    return {"context": context, "question": question, "answers": {"text": [answer], "answer_start": [start]},
            "prompt": prompt, "response": answer, "entity": entity.name, "attribute": attribute}


def render_ner(ctx: Context) -> dict:
    """Tokens are the sentence split on spaces; a k-token name gets ``B-T I-T ...`` (k-1 I- tags)."""
    entity = ctx.pick()
    types = {a.name: a.ner_type for a in vocab.ATTRIBUTES[ctx.domain]} | {"name": vocab.ENTITY_TYPE[ctx.domain]}
    values = entity.values()
    tokens, tags, mentions = [], [], []
    for piece in ctx.rng.choice(NER[ctx.domain]).split():
        if not (piece.startswith("{") and piece.endswith("}")):
            tokens.append(piece)
            tags.append("O")
            continue
        slot = piece[1:-1]
        words, tag_type = values[slot].split(), types[slot]
        tokens.extend(words)
        if tag_type is None:
            tags.extend(["O"] * len(words))
        else:
            tags.extend([f"B-{tag_type}"] + [f"I-{tag_type}"] * (len(words) - 1))
            mentions.append(f"{values[slot]} [{tag_type}]")
    text = " ".join(tokens)
    return {"tokens": tokens, "ner_tags": tags, "prompt": f"Tag the entities: {text}",
            "response": "; ".join(mentions), "entity": entity.name}


# ------------------------------------------------------------------------------------- preference
def render_preference(ctx: Context) -> dict:
    """Chosen = faithful answer; rejected = the same answer with one value swapped for a wrong one.

    Half the pairs are summaries (one summary field wrong: unfaithful to the note), half are answers
    to a question about a context (a wrong value of the same attribute).
    """
    entity, rng = ctx.pick(), ctx.rng
    if rng.random() < 0.5:
        text, _ = note(entity, attribute_names(ctx.domain), rng, n_distractors=rng.randint(1, 2))
        attribute = rng.choice(vocab.SUMMARY_ATTRIBUTES[ctx.domain])
        wrong = Entity(entity.name, entity.domain,
                       {**entity.attributes, attribute: _wrong_value(ctx.world, entity, attribute, rng)})
        return {"prompt": f"Summarize the note: {text}", "chosen": summary(entity), "rejected": summary(wrong),
                "source": "summarization", "entity": entity.name, "attribute": attribute}
    prompt, attribute, _, _ = _extractive(ctx, entity)
    return {"prompt": prompt, "chosen": entity.attributes[attribute],
            "rejected": _wrong_value(ctx.world, entity, attribute, rng),
            "source": "extractive_qa", "entity": entity.name, "attribute": attribute}


RENDERERS: dict[str, Callable[[Context], dict]] = {
    "qa": render_qa,
    "summarization": render_summarization,
    "translation": render_translation,
    "domain_classification": render_domain_classification,
    "urgency": render_urgency,
    "extractive_qa": render_extractive_qa,
    "ner": render_ner,
    "preference": render_preference,
}
TASKS: tuple[str, ...] = tuple(RENDERERS)
TASK_KINDS: dict[str, str] = {
    "qa": "generation", "summarization": "generation", "translation": "generation",
    "domain_classification": "classification", "urgency": "classification",
    "extractive_qa": "extractive_qa", "ner": "ner", "preference": "preference",
}


def make_task(
    task: str,
    domain: str | Sequence[str] = "medical",
    split: str = "train",
    n: int = 500,
    seed: int = 0,
    world: World | None = None,
) -> list[dict]:
    """Render ``n`` records of ``task`` per domain.

    Args:
        task: one of :data:`TASKS`.
        domain: a domain name, a list of them, or ``"all"``; ``n`` records are made for each.
        split: ``"train"``, ``"validation"`` or ``"test"`` (entity hold-out; phrasing hold-out for qa).
        n: records per domain.
        seed: seeds the sampling, and the world when ``world`` is None.
        world: the world to render (default: ``World(seed=seed)``, cached).

    Returns:
        Records with ``id``, ``task``, ``domain``, ``kind`` and the kind's keys (docs/internals.md);
        several domains are shuffled together.

    Raises:
        DataError: unknown task, domain or split, or ``n < 0``.
    """
    check_choice("task", task, TASKS)
    domains = resolve_domains(domain)
    check_split(split)
    check_count("n", n)
    world = default_world(seed) if world is None else world
    render = RENDERERS[task]
    records = []
    for name in domains:
        # qa asks about every entity (phrasings are held out); other tasks hold out entities.
        entities = world.split_entities(name, None if task == "qa" else split)
        ctx = Context(world, name, entities, random.Random(f"{seed}|{task}|{name}|{split}"), phrasing=split)
        for i in range(n):
            record = {"id": f"{task}-{name}-{split}-{i}", "task": task, "domain": name, "kind": TASK_KINDS[task]}
            record.update(render(ctx))
            records.append(record)
    if len(domains) > 1:
        random.Random(f"{seed}|{task}|mix|{split}").shuffle(records)
    return records


def label_names(task: str) -> list[str]:
    """The fixed label order of a classification or NER task (``O`` first for NER)."""
    if task == "domain_classification":
        return list(vocab.DOMAINS)
    if task == "urgency":
        return list(vocab.URGENCY_LABELS)
    if task == "ner":
        types = sorted({vocab.ENTITY_TYPE[d] for d in vocab.DOMAINS}
                       | {a.ner_type for d in vocab.DOMAINS for a in vocab.ATTRIBUTES[d] if a.ner_type})
        return ["O"] + [f"{prefix}-{t}" for t in types for prefix in ("B", "I")]
    labelled = [t for t in TASKS if TASK_KINDS[t] in ("classification", "ner")]
    raise DataError(f"task {task!r} has no label names; choose from: {', '.join(labelled)}")
