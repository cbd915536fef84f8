"""Distillation-based domain adaptation: adapt to the domain, stay close to a general teacher on general data.

Idea (the "learning without forgetting" family applied to domain adaptation; e.g. Hinton et al. 2015
soft targets, arXiv:1503.02531, used as a retention regulariser as in Gu et al. 2024's general-data
distillation for continual pretraining): the student minimises its task loss on the target domain
while matching a *general* teacher's next-token distributions on general-domain text,

    L = L_task(domain batch) + w · T² · KL(p_teacher^T ‖ p_student^T)(general batch)

so it gains the domain without drifting on everything else. With w = 0 this is plain fine-tuning
(kept as the comparison row with identical evaluation).

Teachers: ``base`` — the same model with its adapters disabled (:func:`tunelab.tuners.disabled`; no
copy, needs an adapter method); ``initial`` — a frozen copy of the model as the stage starts (works
with full fine-tuning); any other value — a model preset / path / hub id loaded through the zoo (it
must share the student's tokenizer).

Code map: ``setup`` builds the general records (built-in world: ``general_tasks`` of
``general_domain``, training split; or a file ``general_source``) and the teacher; ``loss`` adds the KD
term on a general batch drawn by a seeded :class:`~tunelab.train.samplers.EpochSampler` (its position
is the ``state_dict``) over response positions; ``evaluate`` scores the stage's test data and, for each
of ``probe_domains``, the same tasks' test split of that domain (``<domain>/score``): in-domain,
cross-domain and retention (the general domain) in one result.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tunelab import IGNORE_INDEX
from tunelab.distill.losses import forward_kl
from tunelab.errors import ConfigError
from tunelab.objectives.sft import SFTObjective, SFTOptions
from tunelab.train.objective import LossOutput
from tunelab.train.samplers import EpochSampler


class DomainKDOptions(SFTOptions):
    """Options of the ``domain_kd`` objective."""

    kd_weight: float = Field(1.0, ge=0, description="w: weight of the KD term (0 = plain fine-tuning).")
    temperature: float = Field(2.0, gt=0, description="T: softmax temperature.")
    teacher: str = Field("base", description="'base' (adapters disabled), 'initial' (frozen copy at stage start) "
                         "or a model preset / path / hub id.")
    general_tasks: list[str] = Field(default_factory=lambda: ["qa", "summarization"],
                                     description="Built-in tasks rendered as general data.")
    general_domain: str = Field("general", description="Built-in domain of the general data.")
    general_size: int = Field(200, gt=0, description="General examples per task.")
    general_source: str | None = Field(None, description="A file of general records instead of the built-in world.")
    kd_batch_size: int = Field(8, gt=0, description="General examples per step.")
    probe_domains: list[str] = Field(default_factory=list, description="Built-in domains also scored by evaluate "
                                     "(the same tasks' test split): cross-domain and retention scores.")
    probe_size: int = Field(40, gt=0, description="Test examples per task and probe domain.")
    seed: int = Field(0, ge=0, description="Data seed of the general and probe records.")


def general_records(options: DomainKDOptions) -> list[dict]:
    """The general data the teacher anchors the student on."""
    if options.general_source:
        from tunelab.data import formats

        return formats.load_records(options.general_source)[: options.general_size]
    from tunelab.data import synthetic

    records: list[dict] = []
    for task in options.general_tasks:
        records += synthetic.make_task(task, domain=options.general_domain, split="train", n=options.general_size,
                                       seed=options.seed)
    return records


def probe_scores(objective: SFTObjective, model: nn.Module, records: Sequence[dict], domains: Sequence[str],
                 size: int, seed: int, **kwargs: Any) -> dict[str, float]:
    """``{"<domain>/score": ...}``: the records' tasks, test split of each probe domain."""
    from tunelab.data import synthetic

    tasks = sorted({str(r["task"]) for r in records if r.get("task") in synthetic.TASKS})
    scores = {}
    for domain in domains:
        probe = [r for task in tasks for r in synthetic.make_task(task, domain=domain, split="test", n=size, seed=seed)]
        if probe:
            result = SFTObjective.evaluate(objective, model, probe, **kwargs)
            scores[f"{domain}/score"] = result["score"]
    return scores


class DomainKDObjective(SFTObjective):
    """``domain_kd``: SFT on the domain + w·KL to a general teacher on general data; probes other domains."""

    config_class = DomainKDOptions

    def __init__(self, config=None, **options: Any) -> None:
        super().__init__(config, **options)
        self.general: list[dict] = []
        self.teacher: nn.Module | None = None
        self.order: EpochSampler | None = None

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        super().setup(model, accelerator)
        if self.config.kd_weight == 0:
            return
        self.general = general_records(self.config)
        self.order = EpochSampler(len(self.general), self.config.kd_batch_size, self.config.seed)
        self.teacher = self._teacher(model, accelerator.device)

    def _teacher(self, model: nn.Module, device: Any) -> nn.Module | None:
        from tunelab import tuners

        name = self.config.teacher
        if name == "base":
            configs = tuners.adapters(model).values()
            if not configs or any(config.method == "full" for config in configs):
                raise ConfigError("domain_kd teacher 'base' needs an adapter method (adapters disabled = the base); "
                                  "with full fine-tuning use teacher: initial")
            return None  # tuners.disabled(model) at each step
        if name == "initial":
            teacher = copy.deepcopy(model)
        else:
            from tunelab.models import zoo

            teacher, _ = zoo.load(name, progress=False)
        return teacher.requires_grad_(False).eval().to(device)

    @torch.no_grad()
    def _teacher_logits(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        from tunelab import tuners

        if self.teacher is not None:
            return self.teacher(**inputs).logits
        was_training = model.training
        model.eval()
        try:
            with tuners.disabled(model):
                return model(**inputs).logits
        finally:
            model.train(was_training)

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        task = model(**batch).loss
        if self.config.kd_weight == 0 or not model.training:
            return LossOutput(task, {"ce": float(task.detach())})
        general = self.collate_fn([self.general[i] for i in self.order.next_indices()])
        general = {k: v.to(task.device) for k, v in general.items()}
        inputs = {k: v for k, v in general.items() if k != "labels"}
        teacher = self._teacher_logits(model, inputs)
        student = model(**inputs).logits
        if teacher.shape[-1] != student.shape[-1]:
            raise ConfigError(f"domain_kd: teacher vocabulary ({teacher.shape[-1]}) differs from the student's "
                              f"({student.shape[-1]}); use a teacher with the same tokenizer")
        mask = general["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)
        kd = forward_kl(student[:, :-1], teacher[:, :-1], self.config.temperature, mask)
        return LossOutput(task + self.config.kd_weight * kd, {"ce": float(task.detach()), "kd": float(kd.detach())})

    def evaluate(self, model: nn.Module, records: Sequence[Any], **kwargs: Any) -> dict[str, float]:
        result = super().evaluate(model, records, **kwargs)
        if self.config.probe_domains:
            result.update(probe_scores(self, model, records, self.config.probe_domains, self.config.probe_size,
                                       self.config.seed, **kwargs))
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.state_dict()} if self.order is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.order is not None and "order" in state:
            self.order.load_state_dict(state["order"])
