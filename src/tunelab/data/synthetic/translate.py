"""Translation into Zemish, a rule-based target language that a tiny model can learn.

Zemish is English with three rules, applied token by token to a whitespace-tokenised sentence:

1. **Lexicon.** Every lowercase English word maps to one Zemish word (a seeded, one-to-one lexicon
   of invented words). Other tokens — names, numbers, capitalised words, ``v.`` — are copied.
2. **No articles.** ``the``, ``a`` and ``an`` are dropped.
3. **Verb last.** The sentence's verb (the first token in ``TRANSLATION_VERBS``) moves to the end:
   English SVO becomes Zemish SOV.

    English:  the court heard Ashby v. Holworth in 1987
    Zemish:   tazo Ashby v. Holworth mi 1987 kelu      (tazo = court, mi = in, kelu = heard)

A model must memorise ~250 word pairs, copy unseen names and numbers, and learn one reordering; all
three generalise to held-out entities because the names are copied, never translated.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

from .templates import TRANSLATION_VERBS

LANGUAGE = "Zemish"
ARTICLES: frozenset[str] = frozenset({"the", "a", "an"})
_ONSETS = ("k", "t", "m", "n", "s", "v", "z", "r", "l", "d", "b", "p")
_VOWELS = ("a", "e", "i", "o", "u")


def translation_vocabulary(
    templates: Mapping[str, Iterable[str]], values: Mapping[str, Mapping[str, Iterable[str]]]
) -> set[str]:
    """The lowercase words a translation source can contain: template words and value words.

    Args:
        templates: ``domain -> sentence templates`` (slots like ``{name}`` are skipped).
        values: ``domain -> attribute -> values`` (the vocabulary lists).
    """
    words: set[str] = set()
    for sentences in templates.values():
        for sentence in sentences:
            words.update(w for w in sentence.split() if not w.startswith("{"))
    for by_attribute in values.values():
        for attribute_values in by_attribute.values():
            for value in attribute_values:
                words.update(value.split())
    return {w for w in words if w.islower() and w.isalpha() and w not in ARTICLES}


class Translator:
    """English -> Zemish by the three rules above.

    Args:
        seed: seeds the lexicon (same seed, same lexicon).
        vocabulary: the lowercase English words to put in the lexicon.
    """

    language = LANGUAGE

    def __init__(self, seed: int, vocabulary: Iterable[str]) -> None:
        rng = random.Random(f"lexicon|{seed}")
        words = sorted(vocabulary)  # sorted: the lexicon must not depend on set iteration order
        taken = set(words)
        self.lexicon: dict[str, str] = {}
        for word in words:
            target = _invent(rng)
            while target in taken:
                target = _invent(rng)
            taken.add(target)
            self.lexicon[word] = target

    def translate(self, sentence: str) -> str:
        """Translate one whitespace-tokenised sentence (no punctuation)."""
        out: list[str] = []
        verb = None
        for token in sentence.split():
            if token in ARTICLES:
                continue
            target = self.lexicon.get(token, token)
            if verb is None and token in TRANSLATION_VERBS:
                verb = target
                continue
            out.append(target)
        if verb is not None:
            out.append(verb)
        return " ".join(out)


def _invent(rng: random.Random) -> str:
    """A pronounceable lowercase word of two or three consonant-vowel syllables."""
    n_syllables = rng.choice((2, 2, 3))
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n_syllables))
