"""Prompt engineering without training: zero-shot and k-shot in-context prompts.

Idea (Brown et al. 2020, "Language Models are Few-Shot Learners", arXiv:2005.14165): instead of
changing θ, show the model k solved examples of the domain's task in its context and let it continue
the pattern,

    ŷ = argmax p_θ(y | d_1, …, d_k, x),     d_i = (x_i, y_i) drawn from the domain's training data

with k = 0 the zero-shot baseline (the untrained model on the plain prompt). No parameter changes, so
nothing is forgotten; the cost moves to inference (a k-times longer prompt) and the gain depends
heavily on model size.

Code map: "training" is a no-op — ``loss`` returns ``0 · w`` for a scalar parameter ``w`` the
objective owns (``modules``), so the loop's optimizer steps leave every model weight untouched (their
gradients stay ``None``; AdamW skips them) and ``train.max_steps: 1`` is the whole cost. The
stage's training records become the demonstration pool (captured by ``sampler``/``on_stage_end``);
``evaluate`` prepends, to each test prompt, k demonstrations of the same task drawn with a generator
seeded by ``(seed, record id)`` — the same demos for a record in every run — each rendered as
``prompt + response`` with the same template, separated by blank lines.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tunelab.objectives.sft import SFTObjective, SFTOptions
from tunelab.train.objective import LossOutput


class ICLOptions(SFTOptions):
    """Options of the ``icl`` objective."""

    k: int = Field(2, ge=0, description="Demonstrations per test prompt (0 = zero-shot).")
    seed: int = Field(0, ge=0, description="Seeds the choice of demonstrations.")
    separator: str = Field("\n\n", description="Text between demonstrations and before the query.")


class _NoOp(nn.Module):
    """One scalar the loss multiplies by zero: gives the optimizer something to step, changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))


def with_demonstrations(records: Sequence[dict], pool: Sequence[dict], k: int, seed: int, template: str = "plain",
                        separator: str = "\n\n", tokenizer: Any = None) -> list[dict]:
    """Copies of ``records`` preceded by k demonstrations of the same task from ``pool``.

    Plain text (``template`` ``plain``/``none``, or ``auto`` without a chat template): the demos are
    prepended to ``prompt``. Chat templates: the record gets ``messages`` = [system?] + the demos as
    user/assistant turns + its own conversation, so its prompt and reference answer are unchanged.
    """
    from tunelab.data.templates import conversation, resolve_template
    from tunelab.eval.tasks import reference_text, render

    if k == 0 or not pool:
        return [dict(r) for r in records]
    by_task: dict[str, list[dict]] = {}
    for demo in pool:
        by_task.setdefault(str(demo.get("task", demo.get("kind"))), []).append(demo)
    out = []
    for record in records:
        candidates = by_task.get(str(record.get("task", record.get("kind")))) or list(pool)
        candidates = [d for d in candidates if d.get("id") is None or d.get("id") != record.get("id")]
        rng = random.Random(f"{seed}|{record.get('id', record.get('prompt'))}")
        demos = rng.sample(candidates, min(k, len(candidates)))
        if resolve_template(template, tokenizer) not in ("plain", "none"):
            own = conversation(record)
            system = [m for m in own if m["role"] == "system"]
            turns = [m for d in demos for m in conversation(d) if m["role"] != "system"]
            out.append({**record, "messages": system + turns + [m for m in own if m["role"] != "system"]})
            continue
        block = separator.join(render(d, template, tokenizer=tokenizer) + reference_text(d) for d in demos)
        out.append({**record, "prompt": block + separator + str(record["prompt"])})
    return out


class ICLObjective(SFTObjective):
    """``icl``: no training; evaluation with k in-context demonstrations from the training data."""

    config_class = ICLOptions

    def __init__(self, config=None, **options: Any) -> None:
        super().__init__(config, **options)
        self.noop = _NoOp()
        self.pool: list[dict] = []

    def modules(self) -> list[nn.Module]:
        return [self.noop]

    def sampler(self, records: Sequence[Any], config: Any, rank: int = 0, world_size: int = 1) -> Any:
        self.pool = list(records)
        return None

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        return LossOutput(self.noop.weight * 0.0, {})

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        self.pool = list(records)

    def evaluate(self, model: nn.Module, records: Sequence[Any], **kwargs: Any) -> dict[str, float]:
        prompted = with_demonstrations(records, self.pool, self.config.k, self.config.seed, self.template,
                                       self.config.separator, self.tokenizer)
        return super().evaluate(model, prompted, **kwargs)
