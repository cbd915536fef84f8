"""The plain objectives: SFT, sequence classification, token classification.

Each is a small :class:`~tunelab.train.objective.BaseObjective` subclass registered by one line in
:mod:`tunelab.experiments.registry`; the technique families (``multitask``, ``adapt``, ``distill``,
``align``) add theirs the same way.
"""

from tunelab.objectives.classification import (
    ClassificationObjective,
    ClassificationOptions,
    TokenClassificationObjective,
)
from tunelab.objectives.sft import LMObjective, LMOptions, SFTObjective, SFTOptions

__all__ = [
    "ClassificationObjective", "ClassificationOptions", "LMObjective", "LMOptions", "SFTObjective", "SFTOptions",
    "TokenClassificationObjective",
]
