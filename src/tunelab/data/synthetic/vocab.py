"""The world's fixed vocabulary: domains, attribute schemas, value lists and name syllables.

Everything here is data, not logic. A domain is described by

- the NER type of its entities' names (``ENTITY_TYPE``),
- five typed attributes (``ATTRIBUTES``): where each value comes from (``source``) and its NER type,
- the four attributes that a summary reports, in order (``SUMMARY_ATTRIBUTES``),
- value lists for ``source == "vocab"`` attributes (``VALUES``),
- syllable inventories from which seeded, novel entity names are built (``NAME_SYLLABLES``),
- cue words that decide the rule-based ``urgency`` label (``URGENCY_CUES``).

Value lists of different attributes are disjoint and contain no urgency cue word and no translation
verb, so every label and every answer is recoverable from the text without ambiguity.
"""

from __future__ import annotations

from typing import NamedTuple

DOMAINS: tuple[str, ...] = ("general", "medical", "legal", "technical")
SPLITS: tuple[str, ...] = ("train", "validation", "test")


class Attribute(NamedTuple):
    """One typed attribute of a domain's entities."""

    name: str
    source: str  # "vocab" | "year" | "version" | "person" | "org" | "country" | "river"
    ner_type: str | None  # tag type when the value appears in NER text; None = tagged O


ENTITY_TYPE: dict[str, str] = {"general": "LOC", "medical": "DRUG", "legal": "CASE", "technical": "SOFTWARE"}
ENTITY_NOUN: dict[str, str] = {"general": "city", "medical": "drug", "legal": "case", "technical": "library"}

ATTRIBUTES: dict[str, tuple[Attribute, ...]] = {
    "general": (
        Attribute("country", "country", "LOC"),
        Attribute("river", "river", "LOC"),
        Attribute("founded", "year", None),
        Attribute("industry", "vocab", None),
        Attribute("founder", "person", "PERSON"),
    ),
    "medical": (
        Attribute("drug_class", "vocab", None),
        Attribute("dose", "vocab", None),
        Attribute("condition", "vocab", "CONDITION"),
        Attribute("side_effect", "vocab", None),
        Attribute("manufacturer", "org", "ORG"),
    ),
    "legal": (
        Attribute("court", "vocab", "ORG"),
        Attribute("year", "year", None),
        Attribute("area", "vocab", None),
        Attribute("outcome", "vocab", None),
        Attribute("judge", "person", "PERSON"),
    ),
    "technical": (
        Attribute("language", "vocab", None),
        Attribute("version", "version", None),
        Attribute("license", "vocab", None),
        Attribute("purpose", "vocab", None),
        Attribute("maintainer", "org", "ORG"),
    ),
}

# The summary is "name | a1 | a2 | a3 | a4": the first four attributes, in the order above. The fifth
# attribute still appears in the note, so the summary must *select*, not copy everything.
SUMMARY_ATTRIBUTES: dict[str, tuple[str, ...]] = {d: tuple(a.name for a in ATTRIBUTES[d][:4]) for d in DOMAINS}

YEAR_RANGES: dict[str, tuple[int, int]] = {"general": (1100, 1950), "legal": (1950, 2023)}

VALUES: dict[str, dict[str, tuple[str, ...]]] = {
    "general": {
        "industry": (
            "fishing", "textiles", "wine making", "shipbuilding", "mining", "tea growing", "glassmaking",
            "printing", "pottery", "silk weaving", "salt trade", "timber", "cheese making", "clockmaking",
            "wool trade", "olive oil", "copper smelting", "paper making",
        ),
    },
    "medical": {
        "drug_class": (
            "antiviral", "antibiotic", "analgesic", "antihistamine", "anticoagulant", "beta blocker",
            "statin", "antidepressant", "anticonvulsant", "antifungal", "diuretic", "corticosteroid",
            "antiemetic", "bronchodilator", "sedative", "vasodilator",
        ),
        "dose": tuple(f"{mg} mg" for mg in (5, 10, 20, 25, 40, 50, 75, 100, 150, 200, 250, 300, 400, 500, 600, 800)),
        "condition": (
            "migraine", "hypertension", "asthma", "eczema", "influenza", "arthritis", "epilepsy", "psoriasis",
            "anemia", "gout", "acne", "angina", "bronchitis", "glaucoma", "sinusitis", "tonsillitis",
            "shingles", "vertigo", "colitis", "dermatitis",
        ),
        "side_effect": (
            "nausea", "dizziness", "headache", "rash", "fatigue", "dry mouth", "drowsiness", "cough",
            "blurred vision", "joint pain", "stomach pain", "hair loss", "weight gain", "muscle cramps",
            "itching", "constipation",
        ),
    },
    "legal": {
        "court": (
            "Supreme Court", "Court of Appeal", "High Court", "District Court", "Labour Court", "Tax Tribunal",
            "Family Court", "Commercial Court", "Constitutional Court", "County Court", "Crown Court",
            "Land Court",
        ),
        "area": (
            "contract law", "tort law", "property law", "criminal law", "family law", "employment law",
            "tax law", "privacy law", "competition law", "environmental law", "insurance law",
            "copyright law", "patent law", "immigration law",
        ),
        "outcome": ("upheld", "reversed", "dismissed", "settled", "remanded", "affirmed", "vacated", "withdrawn"),
    },
    "technical": {
        "language": (
            "Python", "Rust", "Go", "Java", "C", "C++", "Haskell", "Kotlin", "Julia", "TypeScript", "Scala",
            "Elixir", "Swift", "Zig", "OCaml", "Lua",
        ),
        "license": (
            "MIT", "Apache-2.0", "GPL-3.0", "BSD-3-Clause", "MPL-2.0", "LGPL-2.1", "ISC", "Unlicense",
            "EPL-2.0", "AGPL-3.0",
        ),
        "purpose": (
            "image compression", "JSON parsing", "data validation", "audio decoding", "date handling",
            "graph layout", "text search", "matrix algebra", "packet capture", "font rendering",
            "log rotation", "task scheduling", "unit conversion", "query planning", "file hashing",
            "color management",
        ),
    },
}

# Name syllables: (onsets, middles, endings). A name is onset + 0-2 middles + ending, capitalised.
# Each domain has its own sound so that names look like drugs, towns, surnames or packages.
NAME_SYLLABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "general": (
        ("bel", "cas", "dun", "esk", "gar", "hal", "kel", "lin", "mor", "nor", "ost", "ran", "sel", "tam",
         "ul", "val", "wes", "yar"),
        ("a", "e", "o", "an", "er", "il", "or", "u"),
        ("mar", "holm", "burg", "ford", "ora", "vik", "stad", "gate", "ton", "dal", "mere", "wick"),
    ),
    "medical": (
        ("zel", "mar", "tor", "vex", "cal", "dra", "fen", "lor", "nex", "pra", "quel", "sor", "tar", "vol",
         "xim", "bri", "cor", "ely"),
        ("vo", "ta", "mi", "le", "pra", "zi", "no", "da", "ri", "xa", "lu", "be"),
        ("rin", "zole", "mab", "pril", "tine", "vir", "olol", "dex", "cept", "nib", "stat", "fen"),
    ),
    "legal": (
        ("ash", "brom", "carr", "dell", "fitz", "grant", "hol", "kings", "lang", "mer", "pem", "rad", "stan",
         "thorn", "wick", "ald", "bar", "cul"),
        ("er", "in", "ing", "el", "am", "ow"),
        ("ley", "ton", "worth", "field", "by", "ridge", "wood", "more", "stone", "well", "croft", "ham"),
    ),
    "technical": (
        ("kor", "zar", "quil", "vex", "flu", "gri", "lum", "nim", "ply", "rax", "sno", "tek", "vor", "wisp",
         "yam", "zen", "dax", "hyp"),
        ("a", "i", "o", "ex", "ar", "el"),
        ("ly", "io", "kit", "js", "db", "flow", "gen", "mux", "ora", "pack", "ql", "tex"),
    ),
}
# Multi-token names (so NER has I- tags): (probability, affixes, "prefix" | "suffix").
NAME_AFFIXES: dict[str, tuple[float, tuple[str, ...], str]] = {
    "general": (0.2, ("Port", "New", "Upper", "Saint"), "prefix"),
    "medical": (0.25, ("XR", "Forte", "Plus", "Retard"), "suffix"),
    "technical": (0.2, ("Core", "Lite", "Studio", "Toolkit"), "suffix"),
}
# Legal entities are cases "A v. B"; sometimes the state is a party.
STATE_PARTY, STATE_PROBABILITY = "State", 0.15

COUNTRY_SYLLABLES = (
    ("vel", "ard", "bor", "cal", "dor", "fel", "gal", "istr", "mar", "nor", "sar", "tel"),
    ("a", "o", "en", "ir"),
    ("ia", "land", "stan", "ora", "eth", "onia"),
)
RIVER_SYLLABLES = (
    ("os", "vel", "dra", "ny", "tes", "am", "or", "sil", "ven", "ilt", "aur", "mes"),
    ("e", "i", "a"),
    ("ra", "ine", "ula", "ore", "enne", "is"),
)
SURNAME_SYLLABLES = (
    ("ab", "bor", "cal", "dre", "em", "fal", "gor", "hes", "ilv", "jor", "kem", "lod", "mav", "ned", "orl",
     "pel", "rus", "sil", "tov", "var"),
    ("a", "e", "i", "o"),
    ("ric", "ova", "sen", "ard", "ek", "ing", "oux", "ani", "dal", "mir"),
)
ORG_SYLLABLES = (
    ("ax", "bel", "cyr", "dex", "ever", "fort", "gen", "hel", "ion", "kin", "lum", "meri", "nov", "orb",
     "pyx", "quan"),
    ("a", "i", "o"),
    ("ix", "ova", "ora", "ant", "ex", "is", "on", "yst"),
)
ORG_SUFFIXES: dict[str, tuple[str, ...]] = {
    "medical": ("Pharma", "Biotech", "Labs", "Therapeutics"),
    "technical": ("Labs", "Systems", "Software", "Foundation"),
}
FIRST_NAMES: tuple[str, ...] = (
    "Ada", "Bren", "Cora", "Dane", "Elin", "Fio", "Gus", "Hana", "Ivo", "Jora", "Kai", "Lena", "Milo",
    "Nia", "Oren", "Pia", "Rhea", "Sven", "Tove", "Uma", "Wren", "Yara", "Zeno", "Alma", "Bo", "Cyra",
)
N_COUNTRIES, N_RIVERS, N_ORGS = 15, 60, 24  # per world; shared by many entities, like real values

# Urgency: the label is the level of the one cue word in the text.
URGENCY_LABELS: tuple[str, ...] = ("low", "medium", "high")
URGENCY_CUES: dict[str, dict[str, tuple[str, ...]]] = {
    "general": {"low": ("light", "minor", "brief"), "medium": ("moderate", "steady", "rising"),
                "high": ("severe", "sudden", "extreme")},
    "medical": {"low": ("mild", "slight", "occasional"), "medium": ("moderate", "persistent", "recurring"),
                "high": ("severe", "sudden", "intense")},
    "legal": {"low": ("routine", "minor", "informal"), "medium": ("pending", "contested", "overdue"),
              "high": ("urgent", "expedited", "emergency")},
    "technical": {"low": ("minor", "cosmetic", "small"), "medium": ("noticeable", "recurring", "moderate"),
                  "high": ("critical", "severe", "blocking")},
}
# What the urgent report is about; medical reports are about the drug's side effects.
URGENCY_EVENTS: dict[str, tuple[str, ...]] = {
    "general": ("flooding", "power cuts", "traffic delays", "water shortages", "storm damage"),
    "medical": VALUES["medical"]["side_effect"],
    "legal": ("motion", "appeal", "hearing", "petition"),
    "technical": ("crash", "memory leak", "slowdown", "build failure", "rendering glitch", "timeout",
                  "deadlock", "install error"),
}
