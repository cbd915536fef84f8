"""The forward passes distillation needs: taps on named modules, teachers as context managers,
early exits, generations, and the size/speed measurement of teacher vs student.

Feature-based terms read intermediate outputs through :class:`~tunelab.models.hooks.FeatureTap`
(never by editing model code). Layer indices (attention transfer, value relation, early exits) are
resolved to module names through the model's decoder-layer list (``model.layers`` in Llama).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.distill import losses
from tunelab.distill.teachers import parameters, weights_mb
from tunelab.errors import ConfigError, MethodError
from tunelab.models.hooks import FeatureTap
from tunelab.utils import unwrap_model


class RecordsCollator:
    """The SFT batch plus ``records`` (the raw records: tasks for per-task teachers, prompts to generate)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, records: list[dict]) -> dict[str, Any]:
        return {**self.inner(records), "records": list(records)}


@dataclass
class Outputs:
    """One forward pass: logits (B, T, V), tapped features by name, last hidden state, attentions."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def run(module: nn.Module, batch: dict[str, Any], names: Sequence[str], hidden: bool, attention: bool) -> Outputs:
    """Forward ``input_ids`` / ``attention_mask`` with taps on ``names``."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # under DDP ``module`` is the wrapper: the taps go on the model's own submodules (their names have no
    # ``module.`` prefix there), the forward goes through the wrapper so that gradients are synchronised
    tap = FeatureTap(unwrap_model(module), list(names)) if names else contextlib.nullcontext()
    with tap:
        out = module(**inputs, output_hidden_states=hidden, output_attentions=attention)
    features = dict(tap.features) if names else {}
    return Outputs(out.logits, features, out.hidden_states[-1] if hidden else None,
                   out.attentions if attention else None)


def layer_names(model: nn.Module) -> list[str]:
    """Names of the transformer layers: the ModuleList of ``config.num_hidden_layers`` blocks
    (``model.layers.<i>`` in Llama, ``bert.encoder.layer.<i>`` in BERT / MiniLM)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return [f"{name}.{i}" for i in range(count)]
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}; use named feature pairs instead")


def value_name(model: nn.Module, layer: int) -> str:
    """The value projection inside decoder layer ``layer`` (``...self_attn.v_proj`` in Llama)."""
    prefix = layer_names(model)[layer]
    for name, _ in model.named_modules():
        if name.startswith(prefix + ".") and name.rsplit(".", 1)[-1] in ("v_proj", "value", "v"):
            return name
    raise ConfigError(f"no value projection (v_proj / value) in {prefix}; drop value_relation for this model")


@dataclass
class Plan:
    """Which modules to tap and what else to return, for the student and the (first) teacher."""

    student_names: list[str]
    teacher_names: list[str]
    hidden: bool
    attention: bool
    exits: dict[int, str]
    student_value: str | None = None
    teacher_value: str | None = None

    @classmethod
    def of(cls, options: Any, student: nn.Module, teacher: nn.Module | None) -> Plan:
        student_names = [pair.student for pair in options.features]
        teacher_names = [pair.teacher for pair in options.features]
        exits = {}
        if options.self_distill is not None:
            names = layer_names(student)
            exits = {layer: names[layer] for layer in options.self_distill.layers}
            student_names += list(exits.values())
        plan = cls(student_names, teacher_names, options.relation is not None, bool(options.attention), exits)
        if options.value_relation is not None and teacher is not None:
            plan.student_value = value_name(student, options.value_relation.student_layer)
            plan.teacher_value = value_name(teacher, options.value_relation.teacher_layer)
            plan.student_names.append(plan.student_value)
            plan.teacher_names.append(plan.teacher_value)
        plan.student_names = list(dict.fromkeys(plan.student_names))
        plan.teacher_names = list(dict.fromkeys(plan.teacher_names))
        return plan


def feature_widths(student: nn.Module, teacher: nn.Module, pairs: Sequence[Any]) -> dict[str, tuple[int, int]]:
    """``{"s->t": (student width, teacher width)}`` for each feature pair, from a 2-token probe pass."""
    widths = {}
    with torch.no_grad():
        for module, names in ((student, [p.student for p in pairs]), (teacher, [p.teacher for p in pairs])):
            probe = torch.tensor([[1, 2]], device=next(module.parameters()).device)
            with FeatureTap(module, names) as tap:
                module(input_ids=probe, attention_mask=torch.ones_like(probe))
            widths.update({(id(module), name): value.shape[-1] for name, value in tap.features.items()})
    return {pair_name(p): (widths[(id(student), p.student)], widths[(id(teacher), p.teacher)]) for p in pairs}


def pair_name(pair: Any) -> str:
    return f"{pair.student}->{pair.teacher}"


def hidden_terms(pairs: Sequence[Any], student: Outputs, teacher: Outputs, projector: nn.Module | None,
                 attention_mask: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
    """``feature/<s>-><t>``: hidden MSE or cosine of each pair through its learned projection (FitNets)."""
    terms = {}
    for pair in pairs:
        name = pair_name(pair)
        loss = losses.hidden_mse if pair.loss == "mse" else losses.hidden_cosine
        terms[f"feature/{name}"] = (pair.weight, loss(student.features[pair.student], teacher.features[pair.teacher],
                                                      projection=lambda h, n=name: projector(n, h), mask=attention_mask))
    return terms


def feature_terms(options: Any, plan: Plan, student: Outputs, teacher: Outputs, projector: nn.Module | None,
                  attention_mask: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
    """Hidden-state, attention, value-relation and relation terms: ``{name: (weight, value)}``."""
    terms = hidden_terms(options.features, student, teacher, projector, attention_mask)
    for pair in options.attention:
        terms[f"attention/{pair.student_layer}->{pair.teacher_layer}"] = (pair.weight, losses.attention_transfer(
            student.attentions[pair.student_layer], teacher.attentions[pair.teacher_layer], attention_mask))
    if options.value_relation is not None:
        term = options.value_relation
        terms["value_relation"] = (term.weight, losses.value_relation(
            student.features[plan.student_value], teacher.features[plan.teacher_value], term.relation_heads,
            attention_mask))
    if options.relation is not None:
        keep = attention_mask.to(student.hidden.dtype)[:, :, None]  # (B, T, 1)
        pooled_student = (student.hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, D_S)
        pooled_teacher = (teacher.hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, D_T)
        relation = options.relation
        for name, weight, loss, minimum in (("rkd_distance", relation.rkd_distance, losses.rkd_distance, 2),
                                            ("rkd_angle", relation.rkd_angle, losses.rkd_angle, 3),
                                            ("similarity", relation.similarity, losses.similarity_preserving, 1)):
            if weight > 0 and len(pooled_student) >= minimum:
                terms[name] = (weight, loss(pooled_student, pooled_teacher))
    return terms


def early_exit_terms(model: nn.Module, options: Any, plan: Plan, student: Outputs, temperature: float,
                     mask: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
    """Deep-to-shallow: KL(p_final ‖ p_exit(l)), the exit = the model's own final norm + LM head on layer l."""
    model = unwrap_model(model)  # the norm and head are the model's own modules (the same under a DDP wrapper)
    norm = getattr(model.get_decoder(), "norm", None) if hasattr(model, "get_decoder") else None
    if norm is None:
        raise ConfigError(f"self_distill needs a final norm at model.get_decoder().norm ({type(model).__name__})")
    head = model.get_output_embeddings()
    final = student.logits[:, :-1].detach()  # the deepest layer teaches
    terms = {}
    for layer, name in plan.exits.items():
        exit_logits = head(norm(student.features[name]))[:, :-1]  # (B, T-1, V)
        terms[f"exit/{layer}"] = (options.weight, losses.forward_kl(exit_logits, final, temperature, mask))
    return terms


def check_base_teacher(model: nn.Module) -> None:
    """``teacher: base`` needs a student whose adapters can be switched off."""
    from tunelab import tuners

    if not tuners.adapters(model):
        raise ConfigError("teacher 'base' is the student's base model, but the student has no adapter; "
                          "use a PEFT method (lora, ...) or a separate teacher")
    try:
        with tuners.disabled(model):
            pass
    except MethodError as error:
        raise ConfigError(f"teacher 'base': {error}") from None


@contextlib.contextmanager
def as_teacher(model: nn.Module, teacher: nn.Module | None) -> Iterator[nn.Module]:
    """The teacher module; ``None`` means the student with adapters disabled, in eval mode."""
    if teacher is not None:
        yield teacher
        return
    from tunelab import tuners

    was_training = model.training
    model.eval()
    try:
        with tuners.disabled(model):
            yield model
    finally:
        model.train(was_training)


def eager_attention(model: nn.Module) -> None:
    """Attention transfer needs attention probabilities, which only the eager kernel returns."""
    model.set_attn_implementation("eager")


# -------------------------------------------------------------------------------------- generations
def prompt_of(record: dict, template: str, tokenizer: Any) -> str:
    from tunelab.eval import tasks

    return tasks.render(record, template, tokenizer=tokenizer)


def generate(module: nn.Module, tokenizer: Any, records: Sequence[dict], template: str, max_new_tokens: int) -> list[str]:
    """Greedy continuations of the records' prompts (eval mode, restored after)."""
    from tunelab.eval.generate import greedy

    module = unwrap_model(module)  # generation is rank-local: never through the DDP wrapper
    was_training = module.training
    module.eval()
    try:
        prompts = [prompt_of(record, template, tokenizer) for record in records]
        return greedy(module, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts),
                      progress=False)
    finally:
        module.train(was_training)


def with_responses(records: Sequence[dict], responses: Sequence[str]) -> list[dict]:
    return [{**record, "response": response} for record, response in zip(records, responses, strict=True)]


# -------------------------------------------------------------------------------------- analysis
@torch.no_grad()
def size_and_speed(student: nn.Module, teacher: nn.Module | None, batch: dict[str, Any], device: Any,
                   rounds: int = 5) -> dict[str, float]:
    """Parameters, weight size, forward latency (median, rounds alternating) and tokens/s of both models."""
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    tokens = float(inputs["attention_mask"].sum())
    models = {"student": student} if teacher is None or teacher is student else {"student": student, "teacher": teacher}
    times: dict[str, list[float]] = {name: [] for name in models}
    for module in models.values():
        module.eval()
        module(**inputs)  # warm-up
    for _ in range(rounds):
        for name, module in models.items():
            started = time.perf_counter()
            module(**inputs)
            times[name].append(time.perf_counter() - started)
    metrics = {}
    for name, module in models.items():
        seconds = statistics.median(times[name])
        metrics.update({f"{name}_parameters": float(parameters(module)), f"{name}_weights_mb": weights_mb(module),
                        f"{name}_latency_ms": 1000 * seconds, f"{name}_tokens_per_s": tokens / seconds})
    if "teacher" in models:
        metrics["speedup"] = metrics["teacher_latency_ms"] / metrics["student_latency_ms"]
    return metrics


def teacher_comparison(score: float, teacher_score: float, student: nn.Module, teacher: nn.Module | None,
                       batch: dict[str, Any], device: Any) -> dict[str, float]:
    """The metrics the report's distillation section reads: ``teacher_score``, ``retention`` (= score /
    teacher score) and :func:`size_and_speed` of student and teacher on ``batch``."""
    metrics = {"teacher_score": teacher_score, "retention": score / teacher_score if teacher_score else 0.0}
    metrics.update(size_and_speed(student, teacher, batch, device))
    return metrics


def save_model(model: nn.Module, tokenizer: Any, path: str) -> Path:
    """The student for a later generation: its adapter (tuners format) or the whole model."""
    from tunelab import tuners

    target = Path(path)
    if tuners.adapters(model):
        return tuners.save(model, target)
    model.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target
