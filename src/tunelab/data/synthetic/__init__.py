"""The built-in synthetic world and its tasks (see docs/data.md).

A seeded world of entities in four domains (general, medical, legal, technical), rendered into
generation tasks (closed-book ``qa``, ``summarization``, ``translation`` into the rule-based Zemish),
understanding tasks (``domain_classification``, ``urgency``, ``extractive_qa``, ``ner``) and
``preference`` pairs, plus a pretraining ``corpus``. Splits hold out entities (phrasings for ``qa``),
so memorisation and generalisation can be told apart; every answer is known exactly.

    from tunelab.data import synthetic
    records = synthetic.make_task("summarization", domain="medical", split="train", n=500)
    documents = synthetic.corpus(domains=("general",), n_documents=2000)

Modules: ``vocab`` (schemas, values, syllables), ``templates`` (sentences), ``world`` (entities and
splits), ``translate`` (Zemish), ``render`` (notes, summaries), ``tasks`` (records), ``corpus``,
``copying`` (documents about fresh entities that only copying can predict).
"""

from .copying import copying_corpus
from .corpus import corpus, render_example
from .tasks import TASK_KINDS, TASKS, label_names, make_task
from .translate import LANGUAGE, Translator
from .vocab import DOMAINS, SPLITS
from .world import Entity, World, default_world

__all__ = [
    "DOMAINS",
    "LANGUAGE",
    "SPLITS",
    "TASKS",
    "TASK_KINDS",
    "Entity",
    "Translator",
    "World",
    "copying_corpus",
    "corpus",
    "default_world",
    "label_names",
    "make_task",
    "render_example",
]
