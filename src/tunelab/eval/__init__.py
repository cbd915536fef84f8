"""tunelab.eval: metrics, batched greedy generation, and task-level evaluation.

``metrics`` holds pure metric functions, ``generate`` the KV-cached batched greedy decoder, and
``tasks`` maps each record kind to its metrics (see docs/evaluation.md); ``probe`` is the general-ability
(forgetting) probe, held-out general-domain perplexity before and after tuning.
"""

from tunelab.eval import generate, metrics
from tunelab.eval.generate import greedy
from tunelab.eval.tasks import (
    evaluate_classifier,
    evaluate_records,
    evaluate_tagger,
    evaluate_task,
    parse_entities,
    render,
    score_generations,
)

__all__ = [
    "evaluate_classifier",
    "evaluate_records",
    "evaluate_tagger",
    "evaluate_task",
    "generate",
    "greedy",
    "metrics",
    "parse_entities",
    "render",
    "score_generations",
]
