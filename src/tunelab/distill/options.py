"""Options of the ``distill`` objective: teachers, loss terms, schedules and strategies (pydantic).

Every option is checked when the YAML is loaded (unknown keys fail there). The shorthand forms keep
simple configs short: ``teacher: tiny-llama-teacher`` is ``teacher: {model: tiny-llama-teacher}`` and
``temperature: 2.0`` is ``temperature: {kind: constant, start: 2.0}``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunelab.train.objective import ObjectiveConfig

SPECIAL_TEACHERS = ("base", "snapshot")


class Schedule(ObjectiveConfig):
    """A per-step value (temperature, alpha): constant, or linear / cosine from ``start`` to ``end``."""

    kind: Literal["constant", "linear", "cosine"] = "constant"
    start: float = Field(..., description="Value at step 0.")
    end: float | None = Field(None, description="Value at the last step (default: start).")

    def value(self, step: int, total_steps: int | None) -> float:
        from tunelab.distill.losses import schedule_value

        end = self.start if self.end is None else self.end
        if self.kind == "constant" or end == self.start:
            return float(self.start)
        return schedule_value(self.kind, self.start, end, step, total_steps or 1)


def _schedule(value: Any) -> Any:
    return {"start": value} if isinstance(value, int | float) and not isinstance(value, bool) else value


class TeacherFinetune(ObjectiveConfig):
    """Fine-tune the teacher on the stage's training records before distilling (cached on disk)."""

    max_steps: int = Field(100, gt=0, description="Optimizer steps (AdamW, linear decay).")
    learning_rate: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(16, gt=0)
    seed: int = Field(0, ge=0)
    teacher: TeacherSpec | None = Field(None, description="Distil this teacher into the model while fine-tuning "
                                        "(0.5 CE + 0.5 forward KL): a teacher → assistant → student chain.")

    _teacher_string = field_validator("teacher", mode="before")(lambda v: {"model": v} if isinstance(v, str) else v)


class TeacherSpec(ObjectiveConfig):
    """One teacher: a model (preset, path, hub id), ``base`` or ``snapshot``, optionally an adapter."""

    model: str = Field(..., description="Preset, local path or hub id; 'base' = the student with its adapters "
                       "disabled (no second copy); 'snapshot' = a frozen copy of the student as the stage starts "
                       "(born-again: the previous generation teaches the next).")
    adapter: str | None = Field(None, description="A saved adapter (tunelab or PEFT format) loaded onto the model.")
    seed: int = Field(0, ge=0, description="Pretraining seed of tiny presets.")
    weight: float = Field(1.0, gt=0, description="Weight in the ensemble (mean / confidence mixing).")
    tasks: list[str] | None = Field(None, description="Per-task teachers (ensemble: task): rows of these tasks.")
    finetune: TeacherFinetune | None = Field(None, description="Fine-tune this teacher on the training records first.")

    @model_validator(mode="after")
    def _special_has_no_extras(self) -> TeacherSpec:
        if self.model in SPECIAL_TEACHERS and (self.adapter or self.finetune):
            raise ValueError(f"teacher {self.model!r} is the student itself; it takes no adapter or finetune")
        return self


TeacherFinetune.model_rebuild()


def _teacher(value: Any) -> Any:
    return {"model": value} if isinstance(value, str) else value


def check_schedules(alpha: Schedule, temperature: Schedule) -> None:
    """α in [0, 1] and T > 0 at both ends of their schedules."""
    for name in ("start", "end"):
        if getattr(alpha, name) is not None and not 0 <= getattr(alpha, name) <= 1:
            raise ValueError(f"alpha.{name} must be in [0, 1], got {getattr(alpha, name)}")
        if getattr(temperature, name) is not None and getattr(temperature, name) <= 0:
            raise ValueError(f"temperature.{name} must be > 0, got {getattr(temperature, name)}")


class FeaturePair(ObjectiveConfig):
    """A hidden-state match between a student module and a teacher module (FitNets)."""

    student: str = Field(..., description="Student module name (FeatureTap syntax), e.g. model.layers.1.")
    teacher: str = Field(..., description="Teacher module name, e.g. model.layers.3.")
    loss: Literal["mse", "cosine"] = "mse"
    weight: float = Field(1.0, ge=0)


class AttentionPair(ObjectiveConfig):
    """Attention-map transfer between two layers (TinyBERT); both need the same number of heads."""

    student_layer: int
    teacher_layer: int
    weight: float = Field(1.0, ge=0)


class ValueRelationTerm(ObjectiveConfig):
    """MiniLM value-relation transfer between the value projections of two layers."""

    student_layer: int = -1
    teacher_layer: int = -1
    relation_heads: int = Field(4, gt=0, description="Relation heads; must divide both value widths.")
    weight: float = Field(1.0, ge=0)


class RelationTerms(ObjectiveConfig):
    """Relation losses over the batch's pooled last hidden states (masked mean over real tokens)."""

    rkd_distance: float = Field(0.0, ge=0, description="Weight of the RKD distance loss.")
    rkd_angle: float = Field(0.0, ge=0, description="Weight of the RKD angle loss.")
    similarity: float = Field(0.0, ge=0, description="Weight of the similarity-preserving loss.")


class SelfDistill(ObjectiveConfig):
    """Deep-to-shallow self-distillation: shallow layers (through the model's own norm and LM head) learn
    the model's final distribution (Zhang et al. 2019, "Be Your Own Teacher")."""

    layers: list[int] = Field(..., min_length=1, description="Layer indices whose outputs get an early exit.")
    weight: float = Field(1.0, ge=0)


class Peer(ObjectiveConfig):
    """Deep mutual learning: a second student that trains alongside and teaches the first (and vice versa)."""

    model: str = Field(..., description="Preset, local path or hub id of the peer (trained in full).")
    seed: int = Field(0, ge=0)
    weight: float = Field(1.0, ge=0, description="Weight of each KL(peer ‖ student) / KL(student ‖ peer) term.")


class DistillOptions(ObjectiveConfig):
    """Options of the ``distill`` objective (see docs/distill.md § Objectives)."""

    teacher: TeacherSpec | None = Field(None, description="The teacher (shorthand: a model name).")
    teachers: list[TeacherSpec] = Field(default_factory=list, description="Several teachers (an ensemble).")
    ensemble: Literal["mean", "confidence", "task"] = Field("mean", description="How several teachers combine: mean "
                                                            "of probabilities, confidence-weighted per example, per task.")
    loss: Literal["forward_kl", "reverse_kl", "generalized_jsd", "tvd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="β of generalized_jsd (0 forward KL, 1 reverse KL).")
    temperature: Schedule = Field(default_factory=lambda: Schedule(start=1.0))
    alpha: Schedule = Field(default_factory=lambda: Schedule(start=0.5), description="Hard-label weight α: "
                            "L = α CE + (1 − α) w_response L_response + Σ w_j L_j.")
    response_weight: float = Field(1.0, ge=0, description="w_response (0 turns the response term off).")
    features: list[FeaturePair] = Field(default_factory=list)
    attention: list[AttentionPair] = Field(default_factory=list)
    value_relation: ValueRelationTerm | None = None
    relation: RelationTerms | None = None
    self_distill: SelfDistill | None = None
    peer: Peer | None = None
    sequence_level: bool = Field(False, description="Train on the teacher's greedy generations instead of the "
                                 "gold responses (sequence-level KD; generated lazily, cached).")
    on_policy: float = Field(0.0, ge=0, le=1, description="λ: share of steps whose divergence terms run on the "
                             "student's own greedy generations, scored by the teacher (GKD).")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget for sequence-level and on-policy steps.")
    schedule_steps: int | None = Field(None, gt=0, description="Steps over which schedules run (default: max_steps).")
    evaluate_teacher: bool = Field(True, description="Score the teacher on the test data and time both models.")
    save_student: str | None = Field(None, description="Directory the student is saved to at the end of the stage "
                                     "(a later generation's teacher: born-again).")

    _teacher_string = field_validator("teacher", mode="before")(_teacher)
    _teachers_strings = field_validator("teachers", mode="before")(
        lambda v: [_teacher(t) for t in v] if isinstance(v, list) else v)
    _schedules = field_validator("temperature", "alpha", mode="before")(_schedule)

    @model_validator(mode="after")
    def _consistent(self) -> DistillOptions:
        if self.teacher is not None and self.teachers:
            raise ValueError("give either teacher or teachers, not both")
        check_schedules(self.alpha, self.temperature)
        if self.ensemble == "task" and any(t.tasks is None for t in self.all_teachers[:-1]):
            raise ValueError("ensemble 'task' needs 'tasks' on every teacher (the last may omit it: the fallback)")
        needs_teacher = self.features or self.attention or self.value_relation or self.relation \
            or self.sequence_level or self.on_policy
        if needs_teacher and not self.all_teachers:
            raise ValueError("feature, relation, sequence-level and on-policy terms need a teacher; set 'teacher'")
        return self

    @property
    def all_teachers(self) -> list[TeacherSpec]:
        return [self.teacher] if self.teacher is not None else list(self.teachers)


class DistillClassificationOptions(ObjectiveConfig):
    """Options of the ``distill_classification`` objective (see docs/distill.md § Classification)."""

    teacher: TeacherSpec = Field(..., description="The teacher classifier (shorthand: a model name): a directory "
                                 "of a classifier trained on the same labels, or any model with `finetune`.")
    temperature: Schedule = Field(default_factory=lambda: Schedule(start=1.0))
    alpha: Schedule = Field(default_factory=lambda: Schedule(start=0.5), description="Hard-label weight α: "
                            "L = α CE + (1 − α) T² KL + Σ w_j L_j.")
    features: list[FeaturePair] = Field(default_factory=list, description="Hidden-state pairs (FeatureTap names, "
                                        "e.g. bert.encoder.layer.2), learned projection when widths differ.")
    schedule_steps: int | None = Field(None, gt=0, description="Steps over which schedules run (default: max_steps).")
    evaluate_teacher: bool = Field(True, description="Score the teacher on the test data and time both models.")

    _teacher_string = field_validator("teacher", mode="before")(_teacher)
    _schedules = field_validator("temperature", "alpha", mode="before")(_schedule)

    @model_validator(mode="after")
    def _consistent(self) -> DistillClassificationOptions:
        check_schedules(self.alpha, self.temperature)
        if self.teacher.model in SPECIAL_TEACHERS:
            raise ValueError(f"teacher {self.teacher.model!r} is not supported for classification; give a model")
        if self.teacher.tasks or (self.teacher.finetune and self.teacher.finetune.teacher):
            raise ValueError("a classification teacher takes no tasks and no finetune.teacher (one teacher, "
                             "fine-tuned on the labels)")
        return self
