"""Pretraining documents rendered from the world.

A pretrained tiny model should know the *formats* and the *skills* (copying values out of a note,
extracting a span, copying names through a translation) before it is fine-tuned on another domain. So
the corpus mixes two kinds of documents, each ~50-150 words:

- **encyclopedic paragraphs**: every attribute of one entity, plus background sentences;
- **task documents**: examples of the tasks, each rendered as ``prompt + "\\n" + response`` (the plain
  SFT rendering), joined by blank lines until the document has at least 50 words.

Documents are about the entities of one split only, so ``split="validation"`` gives a held-out corpus
(entities never seen in the train corpus) for perplexity. Closed-book QA documents use only the train
phrasings, as in :func:`make_task`'s train split.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tunelab.errors import DataError

from .checks import check_count, check_split, resolve_domains
from .render import encyclopedia
from .tasks import RENDERERS, Context
from .world import World, default_world

MIN_WORDS = 50  # task examples are <= 100 words, so a document stops below 150
# Document mix: encyclopedic text carries the facts; the task documents teach formats and skills.
DOCUMENT_WEIGHTS: dict[str, float] = {
    "encyclopedia": 0.35, "summarization": 0.13, "qa": 0.12, "extractive_qa": 0.1, "translation": 0.1,
    "ner": 0.08, "urgency": 0.06, "domain_classification": 0.06,
}


def render_example(record: dict) -> str:
    """The plain SFT rendering of one record: prompt, newline, response."""
    return f"{record['prompt']}\n{record['response']}"


def _task_document(ctx: Context, task: str) -> str:
    examples, words = [], 0
    while words < MIN_WORDS:
        text = render_example(RENDERERS[task](ctx))
        examples.append(text)
        words += len(text.split())
    return "\n\n".join(examples)


def corpus(
    domains: str | Sequence[str] = ("general",),
    n_documents: int = 2000,
    seed: int = 0,
    split: str = "train",
    world: World | None = None,
    kinds: Sequence[str] | None = None,
) -> list[str]:
    """Pretraining documents about the entities of ``split`` in ``domains``.

    Args:
        domains: a domain, a list of domains, or ``"all"``; each document picks one at random.
        n_documents: how many documents.
        seed: seeds the sampling, and the world when ``world`` is None.
        split: whose entities the documents describe (``"validation"``/``"test"``: held-out corpus).
        world: the world to render (default: ``World(seed=seed)``, cached).
        kinds: restrict the document kinds (keys of :data:`DOCUMENT_WEIGHTS`, e.g. ``("encyclopedia",)``
            for background text only); default: the full mix.

    Returns:
        ``n_documents`` strings of roughly 50-150 words.

    Raises:
        DataError: unknown domain or split, or ``n_documents < 0``.
    """
    names = resolve_domains(domains)
    check_split(split)
    check_count("n_documents", n_documents)
    world = default_world(seed) if world is None else world
    rng = random.Random(f"corpus|{seed}|{split}|{','.join(names)}")
    contexts = {d: Context(world, d, world.split_entities(d, split), rng) for d in names}
    if kinds is not None:
        unknown = [kind for kind in kinds if kind not in DOCUMENT_WEIGHTS]
        if unknown or not kinds:
            raise DataError(f"unknown corpus document kind {unknown[0] if unknown else '(none)'!r}; "
                            f"choose from: {', '.join(DOCUMENT_WEIGHTS)}")
    chosen = list(kinds) if kinds is not None else list(DOCUMENT_WEIGHTS)
    kinds, weights = chosen, [DOCUMENT_WEIGHTS[kind] for kind in chosen]
    documents = []
    for _ in range(n_documents):
        ctx = contexts[rng.choice(names)]
        kind = rng.choices(kinds, weights)[0]
        documents.append(encyclopedia(ctx.pick(), rng, MIN_WORDS) if kind == "encyclopedia"
                         else _task_document(ctx, kind))
    return documents
