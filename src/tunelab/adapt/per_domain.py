"""Per-domain adapters: one adapter per domain, run alone, so learning a domain cannot touch another.

Idea (the AdapterHub pattern, Pfeiffer et al. 2020, arXiv:2007.07779; in continual learning, the
parameter-isolation family, De Lange et al. 2021 §5): stage t trains a new adapter φ_t with the base θ₀
frozen; domain t is then always served by f(x; θ₀, φ_t). Since φ_s for s < t never changes after stage
s and is the only adapter active on domain s, its outputs are bitwise unchanged: zero forgetting by
construction. The price: the domain must be known at inference (an oracle or a router,
:mod:`tunelab.adapt.router`) and nothing transfers between domains.

Code map: every stage adds an adapter through its stage ``method:``; ``setup`` activates only that
adapter (the runner leaves earlier ones active), ``evaluate`` activates the adapter of *its own* stage
for scoring and restores the previous set; an objective built for a stage that has not trained yet
(``eval.cross_stages: all``) scores the base model (adapters disabled) — the untrained reference.
``on_stage_end`` records ``{domain: adapter}`` in the model's cross-stage store for the router.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import nn

from tunelab.adapt.store import store, trainable_adapter
from tunelab.errors import ConfigError
from tunelab.objectives.sft import SFTObjective, SFTOptions


class PerDomainOptions(SFTOptions):
    """Options of the ``per_domain`` objective (none of its own)."""


def record_domain(records: Sequence[Any]) -> str | None:
    """The most common ``domain`` field of ``records`` (None when they carry none)."""
    counts = Counter(str(r["domain"]) for r in records if isinstance(r, dict) and "domain" in r)
    return counts.most_common(1)[0][0] if counts else None


class PerDomainObjective(SFTObjective):
    """``per_domain``: SFT of this stage's own adapter, run alone; scored with that adapter only."""

    config_class = PerDomainOptions

    def __init__(self, config=None, **options: Any) -> None:
        super().__init__(config, **options)
        self.adapter: str | None = None

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        from tunelab import tuners

        super().setup(model, accelerator)
        self.adapter = trainable_adapter(model)
        if self.adapter is None or self.adapter in store(model).get("domain_adapters", {}).values():
            raise ConfigError("objective per_domain needs a new adapter per stage: give every stage "
                              "`method: {name: lora, ...}` (the runner adds it under the stage's name)")
        tuners.set_active(model, [self.adapter])

    def evaluate(self, model: nn.Module, records: Sequence[Any], **kwargs: Any) -> dict[str, float]:
        from tunelab import tuners

        if self.adapter is None:
            with tuners.disabled(model):
                return super().evaluate(model, records, **kwargs)
        previous = tuners.active_adapters(model)
        tuners.set_active(model, [self.adapter])
        try:
            return super().evaluate(model, records, **kwargs)
        finally:
            tuners.set_active(model, previous)

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        if self.adapter is not None:
            domain = record_domain(records) or self.adapter
            store(model).setdefault("domain_adapters", {})[domain] = self.adapter

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter}  # a resumed run's finished stage still scores with its own adapter

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adapter = state.get("adapter", self.adapter)
