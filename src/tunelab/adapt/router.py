"""Domain identification: route each input to its domain's adapter.

One model serves all domains with per-domain adapters (:mod:`tunelab.adapt.per_domain`) if something
picks the adapter per input. Two options exist: (a) a small classifier over the frozen backbone's
features, (b) the adapters' own likelihoods (run every adapter, pick the one under which the prompt is
most probable, as PEFT's Arrow/X-LoRA-style selectors do). We use (a):

    d̂(x) = argmax_d softmax(W · mean_t h_t(x) + c)_d,      h = the *base* model's last hidden states

because it costs one backbone pass and one (H × D) matrix per input, independent of the number of
domains — (b) costs D forward passes — and because domains of the built-in world (and of real corpora)
differ in vocabulary, which pooled features separate easily. The backbone runs with adapters disabled
and without gradients: the router cannot disturb any domain, and only W, c train.

Scores: routing accuracy = mean 1[d̂(x) = d(x)]; the *routed* score evaluates each test record with
the adapter of d̂(x), the *oracle* score with the adapter of its true domain d(x); per task the score is
the record-weighted mean over the routed groups, and ``score`` their macro average (as
:func:`tunelab.eval.tasks.evaluate_records`). ``routed / oracle`` is the cost of not knowing the domain.

Code map: ``router`` is an objective for a final stage whose data is the union of the domains (the
records' ``domain`` field is the label); its head is a :class:`tunelab.models.heads.TaskHeads`
classification head with mean pooling (``modules``: it joins the optimizer and the checkpoint); the
domain → adapter map comes from the ``per_domain`` stages (the model's cross-stage store).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tunelab.adapt.store import store
from tunelab.objectives.sft import SFTObjective, SFTOptions
from tunelab.train.objective import LossOutput

HEAD = "domain"


class RouterOptions(SFTOptions):
    """Options of the ``router`` objective."""

    domains: list[str] = Field(default_factory=lambda: ["general", "medical", "legal", "technical"],
                               description="Domain names (the classes), matched against each record's 'domain'.")
    pooling: str = Field("mean", description="Pooling of the last hidden states: mean, last or first.")


class _FrozenBase:
    """Calls the model with adapters disabled and without gradients (the router's feature extractor)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, **inputs: Any) -> Any:
        from tunelab import tuners

        with torch.no_grad(), tuners.disabled(self.model):
            return self.model(**inputs)


class _PromptCollator:
    """Records -> prompt token ids (the router sees the input only) + domain indices as ``labels``."""

    def __init__(self, tokenizer: Any, domains: list[str], max_length: int, template: str) -> None:
        from tunelab.data.collate import pad_token_id

        self.tokenizer, self.domains, self.max_length, self.template = tokenizer, domains, max_length, template
        self.pad = pad_token_id(tokenizer)

    def __call__(self, records: list[dict]) -> dict:
        from tunelab.data.collate import pad_right
        from tunelab.eval.tasks import render

        ids = [list(self.tokenizer(render(r, self.template), add_special_tokens=False)["input_ids"])[-self.max_length:]
               or [self.pad] for r in records]
        input_ids = pad_right(ids, self.pad)  # (B, T)
        attention_mask = pad_right([[1] * len(s) for s in ids], 0, input_ids.shape[1])  # (B, T)
        labels = torch.tensor([self.domains.index(r["domain"]) if r.get("domain") in self.domains else -100
                               for r in records])  # (B,)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class RouterObjective(SFTObjective):
    """``router``: trains a domain classifier on frozen base features; scores routed vs oracle adapters."""

    config_class = RouterOptions

    def __init__(self, config=None, **options: Any) -> None:
        super().__init__(config, **options)
        self.heads: nn.Module | None = None

    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 256,
                      template: str = "plain", **_: Any) -> Callable:
        self.template = template
        return _PromptCollator(tokenizer, list(self.config.domains), max_length, template)

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        self._ensure_heads(model)
        super().setup(model, accelerator)

    def _ensure_heads(self, model: nn.Module) -> nn.Module:
        from tunelab.models import TaskHeads

        if self.heads is None:
            self.heads = TaskHeads.for_model(model)
            self.heads.add_head(HEAD, "classification", label_names=list(self.config.domains),
                                pooling=self.config.pooling)
        return self.heads

    def modules(self) -> list[nn.Module]:
        return [self.heads] if self.heads is not None else []

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        out = self.heads(_FrozenBase(model), batch, task=HEAD)
        accuracy = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        return LossOutput(out.loss, {"route_acc": float(accuracy)})

    @torch.no_grad()
    def predict(self, model: nn.Module, records: Sequence[dict], batch_size: int = 32) -> list[str]:
        """The routed domain of each record."""
        self._ensure_heads(model)
        device = next(model.parameters()).device
        predictions: list[str] = []
        for start in range(0, len(records), batch_size):
            batch = self.collate_fn(list(records[start : start + batch_size]))
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = self.heads(_FrozenBase(model), batch, task=HEAD).logits  # (B, D)
            predictions += [self.config.domains[i] for i in logits.argmax(-1).tolist()]
        return predictions

    def evaluate(self, model: nn.Module, records: Sequence[Any], **kwargs: Any) -> dict[str, float]:
        predicted = self.predict(model, records, kwargs.get("batch_size", 32))
        accuracy = sum(p == r.get("domain") for p, r in zip(predicted, records, strict=True)) / len(records)
        adapters = store(model).get("domain_adapters", {})
        routed = self._grouped_score(model, records, predicted, adapters, **kwargs)
        oracle = self._grouped_score(model, records, [str(r.get("domain")) for r in records], adapters, **kwargs)
        return {"score": routed, "routing_accuracy": accuracy, "oracle_score": oracle,
                "routed_vs_oracle": routed / oracle if oracle else float("nan")}

    def _grouped_score(self, model: nn.Module, records: Sequence[dict], domains: Sequence[str],
                       adapters: dict[str, str], **kwargs: Any) -> float:
        """Macro over tasks of the record-weighted task score, each record run with its domain's adapter."""
        from tunelab import tuners

        groups: dict[str, list[dict]] = defaultdict(list)
        for record, domain in zip(records, domains, strict=True):
            groups[domain].append(record)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        previous = tuners.active_adapters(model)
        try:
            for domain, group in groups.items():
                if domain in adapters:
                    tuners.set_active(model, [adapters[domain]])
                    result = SFTObjective.evaluate(self, model, group, **kwargs)
                else:
                    with tuners.disabled(model):
                        result = SFTObjective.evaluate(self, model, group, **kwargs)
                for task in {str(r.get("task") or r.get("kind")) for r in group}:
                    n = sum(1 for r in group if str(r.get("task") or r.get("kind")) == task)
                    sums[task] += result[f"{task}/score"] * n
                    counts[task] += n
        finally:
            if previous:
                tuners.set_active(model, previous)
        return sum(sums[t] / counts[t] for t in sums) / len(sums)
