"""The ``distill`` objective: a student learns from teacher(s) through a weighted sum of KD terms.

Idea: the student matches the teacher's next-token distributions (response), intermediate states
(features) and batch geometry (relations), mixed with the hard labels (Hinton et al. 2015). One
objective covers the strategies: an ensemble of teachers, the student's own base as teacher,
born-again generations, deep-to-shallow self-distillation, mutual learning with a peer, sequence-level
KD and on-policy (GKD) steps.

    L = α(s) · CE(y | student)                                   hard labels, α(s) scheduled per step
      + (1 − α(s)) · w_r · D_T(s)(p_teacher ‖ p_student)         D ∈ {forward_kl, reverse_kl, generalized_jsd, tvd}
      + Σ_j w_j · L_j                                            features, attention, value relation, RKD,
                                                                 similarity, early exits, mutual terms

Every term comes from :mod:`tunelab.distill.losses` (the tested pure functions), is logged under its
own name in ``LossOutput.metrics`` (unweighted) with the current ``temperature`` and ``alpha``.
Response terms compare aligned positions: logits at t predict token t + 1, so both sides use
``logits[:, :-1]`` and the mask ``labels[:, 1:] != -100`` (the response tokens).

Code map: options in :mod:`~tunelab.distill.options`; loading, freezing, vocabulary check, fine-tuning
and ensembles in :mod:`~tunelab.distill.teachers`; the extra forward passes (features, attention,
generations) in :mod:`~tunelab.distill.passes`; this file wires them into the objective hooks.
The step counter (schedules, on-policy coin) is the objective's state, saved in the checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tunelab.distill import losses, passes, teachers
from tunelab.distill.features import FeatureProjector
from tunelab.distill.options import DistillOptions
from tunelab.errors import ConfigError
from tunelab.objectives.sft import SFTObjective
from tunelab.train.objective import LossOutput

RESPONSE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": losses.forward_kl, "reverse_kl": losses.reverse_kl, "tvd": losses.total_variation,
}


class DistillObjective(SFTObjective):
    """``distill``: knowledge distillation from one or several teachers (see the module docstring)."""

    config_class = DistillOptions
    model_task = "causal_lm"

    def __init__(self, config: DistillOptions | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.options: DistillOptions = self.config
        self.specs = self.options.all_teachers
        self.teachers: list[nn.Module | None] = []  # None = the student with adapters disabled ("base")
        self.projector: FeatureProjector | None = None
        self.peer: nn.Module | None = None
        self.calls, self.accumulation, self.total_steps, self.seed = 0, 1, self.options.schedule_steps, 0
        self.prepared, self.max_length, self.device = False, 256, torch.device("cpu")
        self.generations: dict[str, str] = {}  # prompt -> teacher's greedy response (sequence-level KD)
        self.teacher_scores: dict[tuple[int, int], dict[str, float]] = {}

    # ------------------------------------------------------------------------------------ data
    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 256,
                      template: str = "plain", **_: Any) -> Callable:
        self.template, self.max_length = template, max_length
        return passes.RecordsCollator(super().make_collator(tokenizer, labels, max_length, template))

    # ------------------------------------------------------------------------------------ set-up
    def setup(self, model: nn.Module, accelerator: Any) -> None:
        """Load and freeze the teachers on the device, build the projector and the peer."""
        self.device = accelerator.device
        self.accumulation = getattr(accelerator, "gradient_accumulation_steps", 1) or 1
        if self.options.attention:
            passes.eager_attention(model)
        self.teachers = [self._load_teacher(spec, model) for spec in self.specs]
        if self.options.features:
            self.projector = FeatureProjector(passes.feature_widths(model, self._teacher_module(0, model),
                                                                     self.options.features))
        if self.options.peer is not None:
            from tunelab.models import zoo

            peer, tokenizer = zoo.load(self.options.peer.model, seed=self.options.peer.seed, progress=False)
            teachers.check_vocabulary(self.tokenizer, tokenizer, model, peer, self.options.peer.model)
            self.peer = peer.train().requires_grad_(True)
        self.plan = passes.Plan.of(self.options, model, self._teacher_module(0, model) if self.specs else None)
        self.prepared = not any(spec.finetune for spec in self.specs)
        super().setup(model, accelerator)

    def _load_teacher(self, spec, model: nn.Module) -> nn.Module | None:
        if spec.model == "base":
            passes.check_base_teacher(model)
            return None
        if spec.model == "snapshot":
            return teachers.snapshot(model)
        teacher, tokenizer = teachers.load_model(spec)  # a fine-tuned teacher replaces it in prepare()
        teachers.check_vocabulary(self.tokenizer, tokenizer, model, teacher, spec.model)
        if self.options.attention:
            passes.eager_attention(teacher)
        return teachers.freeze(teacher.to(self.device))

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.projector, self.peer) if m is not None]

    def sampler(self, records: Sequence[Any], config: Any, rank: int = 0, world_size: int = 1) -> Any:
        """Not a sampler: takes the schedule length and seed, and prepares fine-tuned teachers."""
        self.total_steps = self.options.schedule_steps or config.max_steps
        self.seed = config.seed
        self.prepare(records)
        return None

    def prepare(self, records: Sequence[dict]) -> None:
        """Fine-tune the teachers that ask for it on ``records`` (cached); call it with your own sampler."""
        for index, spec in enumerate(self.specs):
            if spec.finetune is not None:
                teacher, _ = teachers.finetuned(spec, records, self.template, self.max_length, self.device)
                if self.options.attention:
                    passes.eager_attention(teacher)
                self.teachers[index] = teachers.freeze(teacher.to(self.device))
        self.prepared = True

    # ------------------------------------------------------------------------------------ loss
    def step(self) -> int:
        return self.calls // self.accumulation

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        if not self.prepared:
            raise ConfigError("teacher.finetune needs the training records: call objective.prepare(records) "
                              "before train() when you pass your own sampler")
        training = model.training and torch.is_grad_enabled()
        step = self.step()
        temperature = self.options.temperature.value(step, self.total_steps)
        alpha = self.options.alpha.value(step, self.total_steps)
        if training:
            self.calls += 1
        records = batch.get("records")
        if training and self.options.sequence_level:
            batch = self._collate(passes.with_responses(records, self._teacher_generations(model, records)))
        kd_batch, on_policy = batch, False
        if training and self.options.on_policy and random.Random(f"{self.seed}-{step}").random() < self.options.on_policy:
            on_policy = True
            kd_batch = self._collate(passes.with_responses(records, passes.generate(
                model, self.tokenizer, records, self.template, self.options.max_new_tokens)))
        terms = self._terms(model, batch, kd_batch, temperature, alpha)
        total, metrics = losses.combine(terms)
        metrics.pop("loss")
        metrics.update(temperature=temperature, alpha=alpha, on_policy=float(on_policy))
        return LossOutput(total, metrics)

    def _terms(self, model, batch, kd_batch, temperature, alpha) -> dict[str, tuple[float, torch.Tensor]]:
        options, terms = self.options, {}
        plan = self.plan
        student = passes.run(model, kd_batch, plan.student_names, plan.hidden, plan.attention)
        labels = kd_batch["labels"][:, 1:]
        mask = losses.mask_from_labels(labels)  # (B, T-1) response positions
        logits = student.logits[:, :-1]  # (B, T-1, V)
        if alpha > 0:
            ce_logits, ce_labels = logits, labels
            if kd_batch is not batch:  # on-policy step: the hard labels stay the gold ones
                ce_logits = passes.run(model, batch, [], False, False).logits[:, :-1]
                ce_labels = batch["labels"][:, 1:]
            terms["ce"] = (alpha, losses.hard_label_ce(ce_logits, ce_labels))
        if self.specs:
            teacher = self._teacher_pass(model, kd_batch, plan, temperature, mask)
            if options.response_weight > 0 and alpha < 1:
                terms["kd"] = ((1 - alpha) * options.response_weight,
                               self._response(logits, teacher.logits[:, :-1], temperature, mask, labels))
            terms.update(passes.feature_terms(options, plan, student, teacher, self.projector,
                                              kd_batch["attention_mask"]))
        if options.self_distill is not None:
            terms.update(passes.early_exit_terms(model, options.self_distill, plan, student, temperature, mask))
        if self.peer is not None:
            peer_logits = passes.run(self.peer, kd_batch, [], False, False).logits[:, :-1]
            weight = options.peer.weight
            terms["peer_ce"] = (1.0, losses.hard_label_ce(peer_logits, labels))
            terms["mutual_student"] = (weight, losses.forward_kl(logits, peer_logits.detach(), temperature, mask))
            terms["mutual_peer"] = (weight, losses.forward_kl(peer_logits, logits.detach(), temperature, mask))
        if not terms:
            raise ConfigError("the distill objective has no active term; set a teacher, alpha > 0, self_distill or peer")
        return terms

    def _response(self, student_logits, teacher_logits, temperature, mask, labels) -> torch.Tensor:
        if self.options.loss == "generalized_jsd":
            return losses.generalized_jsd(student_logits, teacher_logits, beta=self.options.beta,
                                          temperature=temperature, mask=mask)
        return RESPONSE_LOSSES[self.options.loss](student_logits, teacher_logits, temperature, mask)

    def _teacher_pass(self, model, batch, plan, temperature, mask) -> passes.Outputs:
        """Every teacher under no_grad; the first gives features, their mixture the logits."""
        outputs = []
        for index in range(len(self.specs)):
            with passes.as_teacher(model, self.teachers[index]) as teacher, torch.no_grad():
                names = plan.teacher_names if index == 0 else []
                outputs.append(passes.run(teacher, batch, names, plan.hidden and index == 0,
                                          plan.attention and index == 0))
        rows = None
        if self.options.ensemble == "task":
            rows = teachers.task_rows(self.specs, [r.get("task") for r in batch["records"]])
        mixed = teachers.mix([o.logits for o in outputs], [s.weight for s in self.specs], self.options.ensemble,
                             temperature, nn.functional.pad(mask, (0, 1)), rows)
        return passes.Outputs(mixed, outputs[0].features, outputs[0].hidden, outputs[0].attentions)

    def _teacher_module(self, index: int, model: nn.Module) -> nn.Module:
        return model if self.teachers[index] is None else self.teachers[index]

    def _teacher_generations(self, model, records) -> list[str]:
        missing = [r for r in records if passes.prompt_of(r, self.template, self.tokenizer) not in self.generations]
        if missing:
            with passes.as_teacher(model, self.teachers[0]) as teacher:
                texts = passes.generate(teacher, self.tokenizer, missing, self.template, self.options.max_new_tokens)
            for record, text in zip(missing, texts, strict=True):
                self.generations[passes.prompt_of(record, self.template, self.tokenizer)] = text
        return [self.generations[passes.prompt_of(r, self.template, self.tokenizer)] for r in records]

    def _collate(self, records: list[dict]) -> dict[str, Any]:
        batch = self.collate_fn(records)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------------------------ eval and state
    def evaluate(self, model: nn.Module, records: Sequence[Any], max_new_tokens: int = 32,
                 batch_size: int = 32, progress: bool = True, **kwargs: Any) -> dict[str, float]:
        """The student's task metrics; with ``evaluate_teacher`` the teacher's score, sizes and speeds."""
        from tunelab.eval import tasks

        metrics = super().evaluate(model, records, max_new_tokens, batch_size, progress, **kwargs)
        if self.peer is not None:
            self.peer.eval()
            with tasks.recording():  # the peer's and the teachers' predictions are not the cell's
                metrics["peer_score"] = super().evaluate(self.peer, records, max_new_tokens, batch_size, False)["score"]
            self.peer.train()
        if not (self.options.evaluate_teacher and self.teachers):  # not set up: an untrained-baseline evaluation
            return metrics
        scores = []
        for index in range(len(self.specs)):
            key = (index, id(records))
            if key not in self.teacher_scores:
                with passes.as_teacher(model, self.teachers[index]) as teacher, tasks.recording():
                    self.teacher_scores[key] = super().evaluate(teacher, records, max_new_tokens, batch_size, False)
            scores.append(self.teacher_scores[key]["score"])
            if len(self.specs) > 1:
                metrics[f"teacher{index}_score"] = scores[-1]
        batch = self.collate_fn(list(records[:8]))  # the runner's latency batch
        metrics.update(passes.teacher_comparison(metrics["score"], max(scores), model, self.teachers[0], batch,
                                                 self.device))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        if self.options.save_student:
            passes.save_model(model, self.tokenizer, self.options.save_student)
