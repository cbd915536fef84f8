"""Teachers: loaded once, frozen, in eval mode on the student's device; ensembles of several.

A teacher is a model (a preset, a local path, a hub id, optionally with a saved adapter), or the
student itself: ``base`` runs the student with its adapters disabled (``tuners.disabled``, no second
copy), ``snapshot`` is a frozen copy of the student as the stage starts (born-again networks: the
previous generation teaches the next; Furlanello et al. 2018, arXiv:1805.04770).

Several teachers combine into one distribution (temperature applied per teacher first):

    mean:        p = Σ_k w_k p_k / Σ_k w_k                       (ensemble of probabilities)
    confidence:  p_b = Σ_k c_kb p_kb / Σ_k c_kb,  c_kb = w_k · mean_t max_v p_k(v | b, t)   (per example)
    task:        row b takes the teacher whose ``tasks`` hold its task (the last teacher: the fallback)

and the mixture goes back to the losses as logits ``T · log p``, so that softmax(z / T) = p exactly.
A teacher may be fine-tuned on the training records first (``finetune``; a classifier teacher of
``distill_classification`` with cross-entropy on a head for the run's labels), cached under
``$TUNELAB_HOME/distill/teachers/<hash>`` so every cell of a grid shares one fine-tuned teacher.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tunelab.distill.options import TeacherSpec
from tunelab.errors import ConfigError
from tunelab.utils import tunelab_home

logger = logging.getLogger(__name__)


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode: a teacher never trains and never joins the optimizer."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def check_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any, student: nn.Module, teacher: nn.Module,
                     name: str) -> None:
    """One-line ConfigError when the teacher reads other token ids than the student."""
    if student_tokenizer is not None and teacher_tokenizer is not None:
        student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_vocab != teacher_vocab:
            differing = len(set(student_vocab.items()) ^ set(teacher_vocab.items()))
            raise ConfigError(f"teacher {name!r} has another tokenizer than the student ({len(teacher_vocab)} vs "
                              f"{len(student_vocab)} tokens, {differing} entries differ); distillation needs one "
                              "vocabulary: pick a teacher and student that share a tokenizer")
    student_head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    if student_head is None or teacher_head is None:  # classifiers: class logits, no token head to compare
        return
    student_size, teacher_size = student_head.weight.shape[0], teacher_head.weight.shape[0]
    if student_size != teacher_size:
        raise ConfigError(f"teacher {name!r} predicts {teacher_size} tokens and the student {student_size}; "
                          "distillation needs one vocabulary: pick a teacher and student that share a tokenizer")


def check_labels(student_labels: Sequence[str] | None, teacher: nn.Module, name: str) -> None:
    """One-line ConfigError when a classifier teacher predicts another label set than the student."""
    config = teacher.config
    teacher_labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    if student_labels is not None and teacher_labels != list(student_labels):
        raise ConfigError(f"teacher {name!r} predicts the labels {teacher_labels} and the student {list(student_labels)}; "
                          "distillation needs one label set in one order: give teacher.finetune, or a classifier "
                          "trained on these labels")


def load_model(spec: TeacherSpec, task: str = "causal_lm", labels: Sequence[str] | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a teacher spec (not ``base`` / ``snapshot``), adapter applied.

    ``task`` picks the head (``sequence_classification`` for a classifier teacher); ``labels`` gives a
    new classification head these class names (a teacher about to be fine-tuned), ``None`` keeps the
    model's own head and labels.
    """
    from tunelab.models import zoo

    model, tokenizer = zoo.load(spec.model, task=task, seed=spec.seed, label_names=None if labels is None
                                else list(labels), progress=False)
    if spec.adapter is not None:
        from tunelab import tuners

        tuners.load(model, spec.adapter)
    return model, tokenizer


def cache_key(spec: TeacherSpec, records: Sequence[dict], template: str, max_length: int,
              labels: Sequence[str] | None = None) -> str:
    """Content hash of a fine-tuned teacher: its spec, the training records and the encoding (and for a
    classifier its label set and the records' labels)."""
    content: dict[str, Any] = {"spec": spec.model_dump(mode="json"), "template": template, "max_length": max_length,
                               "records": [[r.get("prompt"), r.get("response"), r.get("text")] for r in records]}
    if labels is not None:  # absent for LM teachers: their keys (and caches) stay what they were
        content.update(labels=list(labels), record_labels=[str(r.get("label")) for r in records])
    payload = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def finetuned(spec: TeacherSpec, records: Sequence[dict], template: str, max_length: int,
              device: torch.device | str = "cpu", labels: Sequence[str] | None = None) -> tuple[nn.Module, Any]:
    """The teacher of ``spec`` fine-tuned on ``records``, cached.

    A causal LM learns the responses (SFT; or is distilled from ``finetune.teacher``); with ``labels`` the
    teacher is a sequence classifier with a new head for these classes, trained with cross-entropy on it
    (the ``classification`` objective's loss).
    """
    from tunelab.models import zoo

    task = "causal_lm" if labels is None else "sequence_classification"
    key = cache_key(spec, records, template, max_length, labels)
    path = tunelab_home() / "distill" / "teachers" / key
    if (path / "config.json").is_file():
        return zoo.load(str(path), task=task, progress=False)
    model, tokenizer = load_model(spec, task, labels)
    guide = None
    if spec.finetune.teacher is not None:
        guide = finetuned(spec.finetune.teacher, records, template, max_length, device) \
            if spec.finetune.teacher.finetune else load_model(spec.finetune.teacher)
        check_vocabulary(tokenizer, guide[1], model, guide[0], spec.finetune.teacher.model)
        guide = freeze(guide[0].to(device))
    logger.info("fine-tuning teacher %s for %d steps (cached as %s)", spec.model, spec.finetune.max_steps, path)
    if labels is None:
        from tunelab.data.collate import SFTCollator

        collate, loss = SFTCollator(tokenizer, max_length=max_length, template=template), _sft_loss(guide)
    else:
        from tunelab.data.collate import ClassificationCollator

        collate, loss = ClassificationCollator(tokenizer, list(labels), max_length=max_length), _classifier_loss
    _fit(model.to(device), records, spec.finetune, collate, loss)
    if spec.adapter is not None:
        from tunelab import tuners

        tuners.merge(model)
        model = tuners.unload(model) or model
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        # under DDP every rank fine-tunes the same teacher (deterministically) and keeps it in memory; rank 0
        # writes the cache (transformers' save_pretrained writes no weights on the other ranks anyway)
        return model, tokenizer
    path.parent.mkdir(parents=True, exist_ok=True)
    # one staging directory per process: concurrent runs (``tunelab run --jobs``) may fine-tune the same
    # teacher; the first rename wins, the others find the cache there and drop their copy
    staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(path)
    except OSError:
        if not (path / "config.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return model, tokenizer


def _fit(model: nn.Module, records: Sequence[dict], options: Any, collate: Callable[[list[dict]], dict],
         loss_of: Callable[[nn.Module, dict], torch.Tensor]) -> None:
    """A plain AdamW loop with linear decay (own RNG, global RNG untouched) over ``loss_of(model, batch)``."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / options.max_steps)
    generator = torch.Generator().manual_seed(options.seed)
    device = next(model.parameters()).device
    order: list[int] = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        for _ in range(options.max_steps):
            if len(order) < options.batch_size:
                order += torch.randperm(len(records), generator=generator).tolist()
            indices, order = order[: options.batch_size], order[options.batch_size:]
            batch = {k: v.to(device) for k, v in collate([records[i] for i in indices]).items()}
            loss_of(model, batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    freeze(model)


def _sft_loss(guide: nn.Module | None) -> Callable[[nn.Module, dict], torch.Tensor]:
    """CE on the response tokens, or ½ CE + ½ KL(guide ‖ model) when a guide teaches the teacher."""
    from tunelab.distill import losses

    def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        loss = losses.hard_label_ce(out.logits[:, :-1], labels)
        if guide is not None:
            with torch.no_grad():
                guide_logits = guide(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            kd = losses.forward_kl(out.logits[:, :-1], guide_logits[:, :-1], mask=losses.mask_from_labels(labels))
            loss = losses.mix_with_hard_labels(loss, kd, 0.5)
        return loss

    return loss_of


def _classifier_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy of the head's class logits (B, C) against the labels (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
    return nn.functional.cross_entropy(logits.float(), batch["labels"])


def snapshot(model: nn.Module) -> nn.Module:
    """A frozen deep copy of the student (born-again teacher)."""
    return freeze(copy.deepcopy(model))


# ------------------------------------------------------------------------------------------- ensembles
def mix(logits: Sequence[torch.Tensor], weights: Sequence[float], how: str, temperature: float,
        mask: torch.Tensor | None = None, rows: Sequence[int] | None = None) -> torch.Tensor:
    """Combine teachers' (B, T, V) logits into one set of logits ``T · log p`` (see the module docstring).

    Args:
        logits: one (B, T, V) tensor per teacher.
        weights: one weight per teacher.
        how: ``mean``, ``confidence`` or ``task``.
        temperature: T, applied to each teacher before mixing.
        mask: (B, T) scored positions, for the per-example confidence.
        rows: for ``task``: the index of the teacher of each row (B,).
    """
    if len(logits) == 1:
        return logits[0]
    if how == "task":
        choice = torch.as_tensor(list(rows), device=logits[0].device)  # (B,)
        stacked = torch.stack(list(logits))  # (K, B, T, V)
        return stacked[choice, torch.arange(len(choice), device=choice.device)]  # (B, T, V)
    probs = torch.stack([torch.softmax(z.float() / temperature, dim=-1) for z in logits])  # (K, B, T, V)
    weight = torch.tensor(list(weights), dtype=probs.dtype, device=probs.device)[:, None]  # (K, 1)
    if how == "confidence":
        top = probs.max(dim=-1).values  # (K, B, T)
        if mask is not None:
            keep = mask.to(top.dtype)[None]  # (1, B, T)
            confidence = (top * keep).sum(-1) / keep.sum(-1).clamp_min(1.0)  # (K, B)
        else:
            confidence = top.mean(-1)
        weight = weight * confidence  # (K, B)
    weight = weight / weight.sum(0, keepdim=True)  # (K, B) or (K, 1)
    mixture = (weight[:, :, None, None] * probs).sum(0)  # (B, T, V)
    return temperature * mixture.clamp_min(1e-30).log()


def task_rows(specs: Sequence[TeacherSpec], tasks: Sequence[str | None]) -> list[int]:
    """For ``ensemble: task``: each row's teacher (the first whose ``tasks`` hold it, else the last)."""
    rows = []
    for task in tasks:
        index = next((k for k, spec in enumerate(specs) if spec.tasks and task in spec.tasks), len(specs) - 1)
        rows.append(index)
    return rows


def weights_mb(model: nn.Module) -> float:
    """Size of the model's weights in MiB (what a safetensors file of its state holds)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total / 2**20


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


