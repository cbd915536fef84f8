"""The objective registry: one explicit ``register_objective(...)`` line per objective, at the bottom.

An experiment's ``objective: {name, options}`` names an entry here; its options are validated by the
entry's pydantic config when the YAML is loaded (a typo fails before any data or model is built).
``tunelab objectives`` lists the entries with their one-line summaries.

Adding an objective: write it as a :class:`~tunelab.train.objective.BaseObjective` subclass in its
family's package, then add one ``register_objective`` line below. No auto-discovery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tunelab.adapt import (
    DomainKDObjective,
    EWCObjective,
    ICLObjective,
    LwFObjective,
    OLoRAObjective,
    PerDomainObjective,
    ReplayObjective,
    RouterObjective,
)
from tunelab.align import DPOObjective, GRPOObjective, KTOObjective, PPOObjective, RewardObjective
from tunelab.distill.classification import DistillClassificationObjective
from tunelab.distill.objective import DistillObjective
from tunelab.errors import ConfigError
from tunelab.multitask import MultitaskEncoderObjective, MultitaskObjective
from tunelab.objectives import (
    ClassificationObjective,
    LMObjective,
    SFTObjective,
    TokenClassificationObjective,
)
from tunelab.train.objective import BaseObjective, ObjectiveConfig


@dataclass(frozen=True)
class ObjectiveEntry:
    """One registered objective: its name, class (with ``config_class``) and a one-line summary."""

    name: str
    objective_class: type[BaseObjective]
    summary: str

    @property
    def config_class(self) -> type[ObjectiveConfig]:
        return self.objective_class.config_class

    @property
    def model_task(self) -> str:
        return self.objective_class.model_task


_OBJECTIVES: dict[str, ObjectiveEntry] = {}


def register_objective(name: str, objective_class: type[BaseObjective], summary: str) -> ObjectiveEntry:
    """Add an objective (its name must be new)."""
    if name in _OBJECTIVES:
        raise ValueError(f"objective {name!r} is registered twice")
    _OBJECTIVES[name] = ObjectiveEntry(name, objective_class, summary)
    return _OBJECTIVES[name]


def objectives() -> list[str]:
    """Registered objective names, in registration order."""
    return list(_OBJECTIVES)


def get_objective(name: str) -> ObjectiveEntry:
    if name not in _OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of: {', '.join(objectives())}")
    return _OBJECTIVES[name]


def objective_config(name: str, options: Mapping[str, Any], where: str = "objective.options") -> ObjectiveConfig:
    """Validate ``options`` of objective ``name``; a one-line ConfigError naming the key otherwise."""
    entry = get_objective(name)
    valid = list(entry.config_class.model_fields)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none (the objective takes no options)"
        raise ConfigError(f"invalid config at '{where}.{unknown[0]}': unknown option for objective {name!r}; "
                          f"valid options: {listed}")
    try:
        return entry.config_class(**options)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"invalid config at '{where}.{field}': {first['msg']}") from None


def build_objective(name: str, options: Mapping[str, Any] | None = None) -> BaseObjective:
    """A fresh objective instance with validated options."""
    return get_objective(name).objective_class(objective_config(name, options or {}))


register_objective("sft", SFTObjective, "supervised fine-tuning: next-token loss on the response, generative eval")
register_objective("lm", LMObjective, "causal language modelling on plain text (continued pretraining: DAPT / TAPT)")
register_objective("classification", ClassificationObjective,
                   "sequence classification with a task head: cross-entropy, accuracy")
register_objective("token_classification", TokenClassificationObjective,
                   "token classification (NER, BIO tags) with a tagging head: cross-entropy, entity F1")
register_objective("icl", ICLObjective, "prompt engineering, no training: zero-/k-shot in-context demos from the "
                   "training data at evaluation")
register_objective("domain_kd", DomainKDObjective, "domain adaptation + KD to a general teacher on general data "
                   "(kd_weight 0 = plain FT); probes other domains")
register_objective("replay", ReplayObjective, "continual: SFT mixed with a buffer of earlier stages (reservoir or "
                   "per-domain quota, replay ratio)")
register_objective("ewc", EWCObjective, "continual: SFT + online EWC penalty (diagonal Fisher, decay gamma)")
register_objective("lwf", LwFObjective, "continual: SFT + KD from the model as it was before the stage (LwF)")
register_objective("olora", OLoRAObjective, "continual: a new LoRA per stage, orthogonal to earlier stages' A (O-LoRA)")
register_objective("per_domain", PerDomainObjective, "continual: one adapter per domain, run alone (zero forgetting)")
register_objective("router", RouterObjective, "domain router over the frozen backbone's pooled features; routed "
                   "vs oracle score of per-domain adapters")
register_objective("reward", RewardObjective, "Bradley-Terry reward model: scalar head on any backbone/method, pairwise accuracy")
register_objective("dpo", DPOObjective, "DPO family (sigmoid, ipo, hinge, robust; reference-free orpo, simpo) vs an explicit reference")
register_objective("kto", KTOObjective, "KTO from unpaired desirable/undesirable completions (or split preference pairs)")
register_objective("ppo", PPOObjective, "PPO: sample, score, clipped surrogate + value head, adaptive KL to the reference")
register_objective("grpo", GRPOObjective, "GRPO: G samples per prompt, group-normalised advantages, no value model")
register_objective("distill", DistillObjective, "knowledge distillation: response / feature / relation terms from "
                   "teacher(s), ensembles, self-, online and sequence-level KD, schedules")
register_objective("distill_classification", DistillClassificationObjective, "knowledge distillation of a "
                   "classifier: α CE + (1 − α) T² KL over the teacher's class logits (Hinton), optional features")
register_objective("multitask", MultitaskObjective,
                   "multi-task learning on a decoder: task heads + LM head, shared/per-task/hierarchical adapters")
register_objective("multitask_encoder", MultitaskEncoderObjective,
                   "multi-task learning on an encoder (MiniLM, BERT): understanding tasks with their heads")
