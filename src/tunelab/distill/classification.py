"""The ``distill_classification`` objective: a small classifier learns a bigger one's class distribution.

Idea (Hinton et al. 2015, arXiv:1503.02531): besides the gold label, the student matches the teacher's
softened distribution over the classes, which tells it how alike the classes look for each example.
DistilBERT (Sanh et al. 2019, arXiv:1910.01108) distils BERT into a half-depth student initialised from
its layers (here ``model: {layers: [...]}``).

    L = α(s) · CE(y | z_S)                                          hard labels
      + (1 − α(s)) · T(s)² · KL(softmax(z_T / T) ‖ softmax(z_S / T))  soft targets, T² keeps the gradient scale
      + Σ_j w_j · L_j                                               optional hidden-state pairs (FitNets)

with z_S, z_T the (B, C) class logits of student and teacher, α (hard-label weight) and T scheduled per
step, both terms averaged over the batch. Code map: the class logits go to the tested pure functions of
:mod:`tunelab.distill.losses` as (B, 1, C) — one scored "position" per example — so ``ce`` is
``hard_label_ce`` and ``kd`` is ``forward_kl``; each term is logged unweighted under its name with
``temperature`` and ``alpha``. The teacher (:mod:`~tunelab.distill.teachers`) is a classifier with the
student's tokenizer and label set — a trained one, or any model fine-tuned on the cell's training records
first (``teacher.finetune``, cross-entropy on its head, cached by content). It is frozen, in eval mode
and not an objective module, so it is never in the optimizer or the checkpoint; the feature projector is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tunelab.distill import losses, passes, teachers
from tunelab.distill.features import FeatureProjector
from tunelab.distill.options import DistillClassificationOptions
from tunelab.errors import ConfigError
from tunelab.objectives.classification import ClassificationObjective
from tunelab.train.objective import LossOutput


class DistillClassificationObjective(ClassificationObjective):
    """``distill_classification``: Hinton KD on class logits (see the module docstring)."""

    config_class = DistillClassificationOptions
    model_task = "sequence_classification"

    def __init__(self, config: DistillClassificationOptions | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.options: DistillClassificationOptions = self.config
        self.teacher: nn.Module | None = None
        self.projector: FeatureProjector | None = None
        self.calls, self.accumulation, self.total_steps = 0, 1, self.options.schedule_steps
        self.prepared, self.max_length, self.device = False, 128, torch.device("cpu")
        self.teacher_scores: dict[int, float] = {}  # id(test records) -> the teacher's score

    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 128, **_: Any) -> Callable:
        self.max_length = max_length  # the teacher is fine-tuned on the same encoding
        return super().make_collator(tokenizer, labels, max_length)

    # ------------------------------------------------------------------------------------ set-up
    def setup(self, model: nn.Module, accelerator: Any) -> None:
        """Load, check and freeze the teacher on the device; build the projector."""
        self.device = accelerator.device
        self.accumulation = getattr(accelerator, "gradient_accumulation_steps", 1) or 1
        spec = self.options.teacher
        # a teacher to fine-tune gets a new head for the student's labels (prepare() swaps in the trained one)
        teacher, tokenizer = teachers.load_model(spec, self.model_task, self.labels if spec.finetune else None)
        teachers.check_vocabulary(self.tokenizer, tokenizer, model, teacher, spec.model)
        teachers.check_labels(self.labels, teacher, spec.model)
        self.teacher = teachers.freeze(teacher.to(self.device))
        if self.options.features:
            self.projector = FeatureProjector(passes.feature_widths(model, self.teacher, self.options.features))
        self.prepared = spec.finetune is None
        super().setup(model, accelerator)

    def modules(self) -> list[nn.Module]:
        return [self.projector] if self.projector is not None else []

    def sampler(self, records: Sequence[Any], config: Any, rank: int = 0, world_size: int = 1) -> Any:
        """Not a sampler: takes the schedule length and fine-tunes the teacher if asked."""
        self.total_steps = self.options.schedule_steps or config.max_steps
        self.prepare(records)
        return None

    def prepare(self, records: Sequence[dict]) -> None:
        """Fine-tune the teacher on ``records`` if it asks for it (cached); call it with your own sampler."""
        spec = self.options.teacher
        if spec.finetune is not None:
            teacher, _ = teachers.finetuned(spec, records, "plain", self.max_length, self.device, labels=self.labels)
            self.teacher = teachers.freeze(teacher.to(self.device))
        self.prepared = True

    # ------------------------------------------------------------------------------------ loss
    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        if not self.prepared:
            raise ConfigError("teacher.finetune needs the training records: call objective.prepare(records) "
                              "before train() when you pass your own sampler")
        step = self.calls // self.accumulation
        temperature = self.options.temperature.value(step, self.total_steps)
        alpha = self.options.alpha.value(step, self.total_steps)
        if model.training and torch.is_grad_enabled():  # evaluation losses do not advance the schedules
            self.calls += 1
        pairs = self.options.features
        student = passes.run(model, batch, [p.student for p in pairs], False, False)
        student_logits = student.logits[:, None]  # (B, 1, C): one scored position per example
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        if alpha > 0:
            terms["ce"] = (alpha, losses.hard_label_ce(student_logits, batch["labels"][:, None]))  # labels (B, 1)
        if alpha < 1 or pairs:
            with torch.no_grad():
                teacher = passes.run(self.teacher, batch, [p.teacher for p in pairs], False, False)
            if alpha < 1:
                terms["kd"] = (1 - alpha, losses.forward_kl(student_logits, teacher.logits[:, None], temperature))
            terms.update(passes.hidden_terms(pairs, student, teacher, self.projector, batch["attention_mask"]))
        total, metrics = losses.combine(terms)
        metrics.pop("loss")
        metrics.update(temperature=temperature, alpha=alpha)
        return LossOutput(total, metrics)

    # ------------------------------------------------------------------------------------ eval and state
    def evaluate(self, model: nn.Module, records: Sequence[Any], progress: bool = True, **_: Any) -> dict[str, float]:
        """Accuracy; with ``evaluate_teacher`` the teacher's, retention, sizes and speeds (as ``distill``)."""
        from tunelab.eval import tasks

        metrics = super().evaluate(model, records, progress=progress)
        if not (self.options.evaluate_teacher and self.teacher is not None):  # not set up: the untuned baseline
            return metrics
        if id(records) not in self.teacher_scores:
            with tasks.recording():  # the teacher's predictions are not the cell's
                self.teacher_scores[id(records)] = super().evaluate(self.teacher, records, progress=False)["score"]
        batch = self.collate_fn(list(records[:8]))  # the runner's latency batch
        metrics.update(passes.teacher_comparison(metrics["score"], self.teacher_scores[id(records)], model,
                                                 self.teacher, batch, self.device))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
