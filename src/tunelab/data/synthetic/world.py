"""The world: seeded entities with typed attributes in four domains, split by entity.

A :class:`World` is a small, fully known knowledge base. Each domain (general, medical, legal,
technical) has ``entities_per_domain`` entities; every entity has a novel name built from the domain's
syllable inventory (``vocab.NAME_SYLLABLES``, so the names are new tokens to any tokenizer) and five
typed attribute values (``vocab.ATTRIBUTES``). Because the world is known, every task rendered from it
has an exact answer, and a model's knowledge of it can be measured.

Splits hold out entities: each domain's entities are shuffled once and cut 80/10/10 into train,
validation and test, so a test example is about an entity the model never saw in training.

Everything is a pure function of ``seed``: names, values, splits and the translation lexicon come from
``random.Random`` streams seeded with strings (``random`` hashes strings with SHA-512, so the stream is
the same on every platform and Python run, unlike the built-in ``hash``).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

from tunelab.errors import DataError

from . import vocab
from .templates import TRANSLATION
from .translate import Translator, translation_vocabulary

MIN_ENTITIES = 10  # the smallest world whose 80/10/10 split leaves every split non-empty


@dataclass(frozen=True)
class Entity:
    """One entity: its name, domain and attribute values (``attribute -> value``, schema order)."""

    name: str
    domain: str
    attributes: dict[str, str] = field(hash=False)

    def values(self) -> dict[str, str]:
        """Slot values for templates: the attributes plus ``name``."""
        return {"name": self.name, **self.attributes}


class _Namer:
    """Draws unique capitalised words from syllable inventories (a shared pool keeps names unique)."""

    def __init__(self, rng: random.Random, reserved: set[str]) -> None:
        self.rng = rng
        self.used = set(reserved)
        self._extra_middles: dict[tuple, int] = {}  # per inventory: middles added once short names run out

    def word(self, syllables: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]) -> str:
        onsets, middles, endings = syllables
        while True:
            extra = self._extra_middles.get(syllables, 0)
            for _ in range(50):
                n_middle = extra + self.rng.choice((0, 1, 1))  # mostly one middle syllable
                middle = "".join(self.rng.choice(middles) for _ in range(n_middle))
                word = (self.rng.choice(onsets) + middle + self.rng.choice(endings)).capitalize()
                if word not in self.used:
                    self.used.add(word)
                    return word
            self._extra_middles[syllables] = extra + 1  # 50 collisions in a row: go longer

    def person(self) -> str:
        return f"{self.rng.choice(vocab.FIRST_NAMES)} {self.word(vocab.SURNAME_SYLLABLES)}"


def _reserved_tokens() -> set[str]:
    """Every fixed word of the vocabulary, so no generated name can collide with one."""
    words = set(vocab.FIRST_NAMES) | {vocab.STATE_PARTY}
    for affix in vocab.NAME_AFFIXES.values():
        words.update(affix[1])
    for suffixes in vocab.ORG_SUFFIXES.values():
        words.update(suffixes)
    for by_attribute in vocab.VALUES.values():
        for values in by_attribute.values():
            for value in values:
                words.update(value.split())
    return words


class World:
    """A seeded world of entities in four domains, with entity-disjoint splits.

    Args:
        seed: seed of every random choice; the same seed gives the same world.
        entities_per_domain: entities in each domain (at least 10).

    Attributes:
        entities: ``domain -> tuple[Entity, ...]`` in generation order.
        splits: ``domain -> split -> tuple[Entity, ...]`` (80/10/10, disjoint).
        translator: the rule-based translator into the target language.
    """

    def __init__(self, seed: int = 0, entities_per_domain: int = 200) -> None:
        if not isinstance(entities_per_domain, int) or entities_per_domain < MIN_ENTITIES:
            raise DataError(
                f"entities_per_domain must be an int >= {MIN_ENTITIES}, got {entities_per_domain!r}; "
                "pass a larger World(entities_per_domain=...)"
            )
        self.seed = seed
        self.entities_per_domain = entities_per_domain
        rng = random.Random(f"world|{seed}")
        namer = _Namer(rng, _reserved_tokens())
        self.countries = tuple(namer.word(vocab.COUNTRY_SYLLABLES) for _ in range(vocab.N_COUNTRIES))
        self.rivers = tuple(namer.word(vocab.RIVER_SYLLABLES) for _ in range(vocab.N_RIVERS))
        self.organisations = {
            domain: tuple(f"{namer.word(vocab.ORG_SYLLABLES)} {rng.choice(suffixes)}" for _ in range(vocab.N_ORGS))
            for domain, suffixes in vocab.ORG_SUFFIXES.items()
        }
        self.entities: dict[str, tuple[Entity, ...]] = {
            domain: tuple(self._make_entity(domain, namer, rng) for _ in range(entities_per_domain))
            for domain in vocab.DOMAINS
        }
        self.splits = {domain: _split(self.entities[domain], rng) for domain in vocab.DOMAINS}
        self._split_of = {e.name: s for d in vocab.DOMAINS for s, es in self.splits[d].items() for e in es}
        self._by_name = {e.name: e for d in vocab.DOMAINS for e in self.entities[d]}
        self._pools = self._value_pools()
        self.translator = Translator(seed, translation_vocabulary(TRANSLATION, vocab.VALUES))

    # ----------------------------------------------------------------------------------------- queries
    def split_entities(self, domain: str, split: str | None = None) -> tuple[Entity, ...]:
        """The entities of ``domain`` in ``split`` (all of them when ``split`` is None)."""
        return self.entities[domain] if split is None else self.splits[domain][split]

    def split_of(self, name: str) -> str:
        """Which split an entity (by name) belongs to."""
        return self._split_of[name]

    def entity(self, name: str) -> Entity:
        """Look an entity up by name."""
        return self._by_name[name]

    def values(self, domain: str, attribute: str) -> tuple[str, ...]:
        """Every value an attribute can take in this world (sorted): wrong answers are drawn from here."""
        return self._pools[domain, attribute]

    def invent_entity(self, domain: str, namer: _Namer, rng: random.Random) -> Entity:
        """A new entity of ``domain`` drawn like the world's own, but not part of the world.

        Its name comes from ``namer`` (which must reserve the world's words to stay novel); its values
        from the world's pools. The pretraining corpus uses these for documents that must be read.
        """
        return self._make_entity(domain, namer, rng)

    # ------------------------------------------------------------------------------------ generation
    def _make_entity(self, domain: str, namer: _Namer, rng: random.Random) -> Entity:
        attributes = {a.name: self._make_value(domain, a, namer, rng) for a in vocab.ATTRIBUTES[domain]}
        return Entity(_entity_name(domain, namer, rng), domain, attributes)

    def _make_value(self, domain: str, attribute: vocab.Attribute, namer: _Namer, rng: random.Random) -> str:
        source = attribute.source
        if source == "vocab":
            return rng.choice(vocab.VALUES[domain][attribute.name])
        if source == "year":
            return str(rng.randint(*vocab.YEAR_RANGES[domain]))
        if source == "version":
            return f"{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"
        if source == "person":
            return namer.person()
        if source == "org":
            return rng.choice(self.organisations[domain])
        if source == "country":
            return rng.choice(self.countries)
        if source == "river":
            return rng.choice(self.rivers)
        raise ValueError(f"unknown attribute source {source!r}")

    def _value_pools(self) -> dict[tuple[str, str], tuple[str, ...]]:
        pools = {}
        for domain in vocab.DOMAINS:
            for attribute in vocab.ATTRIBUTES[domain]:
                seen = {e.attributes[attribute.name] for e in self.entities[domain]}
                seen.update(vocab.VALUES[domain].get(attribute.name, ()))
                pools[domain, attribute.name] = tuple(sorted(seen))
        return pools

    def __repr__(self) -> str:
        return f"World(seed={self.seed}, entities_per_domain={self.entities_per_domain})"


def _entity_name(domain: str, namer: _Namer, rng: random.Random) -> str:
    """A novel name; some are multi-token (``Port Belmar``, ``Zelvorin XR``, ``Ashby v. Holworth``)."""
    syllables = vocab.NAME_SYLLABLES[domain]
    if domain == "legal":
        plaintiff = vocab.STATE_PARTY if rng.random() < vocab.STATE_PROBABILITY else namer.word(syllables)
        return f"{plaintiff} v. {namer.word(syllables)}"
    base = namer.word(syllables)
    probability, affixes, position = vocab.NAME_AFFIXES[domain]
    if rng.random() >= probability:
        return base
    affix = rng.choice(affixes)
    return f"{affix} {base}" if position == "prefix" else f"{base} {affix}"


def _split(entities: tuple[Entity, ...], rng: random.Random) -> dict[str, tuple[Entity, ...]]:
    """Shuffle once, then cut 80/10/10 (validation and test get at least one entity each)."""
    order = list(entities)
    rng.shuffle(order)
    n_held_out = max(1, round(0.1 * len(order)))
    return {
        "train": tuple(order[2 * n_held_out:]),
        "validation": tuple(order[:n_held_out]),
        "test": tuple(order[n_held_out:2 * n_held_out]),
    }


@functools.lru_cache(maxsize=8)
def default_world(seed: int = 0, entities_per_domain: int = 200) -> World:
    """The world that ``make_task``/``corpus`` use when none is passed (cached: it is read-only)."""
    return World(seed=seed, entities_per_domain=entities_per_domain)
