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
A teacher may be fine-tuned on the training records first (``finetune``), cached under
``$TUNELAB_HOME/distill/teachers/<hash>`` so every cell of a grid shares one fine-tuned teacher.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
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
    student_size = student.get_output_embeddings().weight.shape[0]
    teacher_size = teacher.get_output_embeddings().weight.shape[0]
    if student_size != teacher_size:
        raise ConfigError(f"teacher {name!r} predicts {teacher_size} tokens and the student {student_size}; "
                          "distillation needs one vocabulary: pick a teacher and student that share a tokenizer")


def load_model(spec: TeacherSpec) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a teacher spec (not ``base`` / ``snapshot``), adapter applied."""
    from tunelab.models import zoo

    model, tokenizer = zoo.load(spec.model, seed=spec.seed, progress=False)
    if spec.adapter is not None:
        from tunelab import tuners

        tuners.load(model, spec.adapter)
    return model, tokenizer


def cache_key(spec: TeacherSpec, records: Sequence[dict], template: str, max_length: int) -> str:
    """Content hash of a fine-tuned teacher: its spec, the training records and the encoding."""
    payload = json.dumps({"spec": spec.model_dump(mode="json"), "template": template, "max_length": max_length,
                          "records": [[r.get("prompt"), r.get("response"), r.get("text")] for r in records]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def finetuned(spec: TeacherSpec, records: Sequence[dict], template: str, max_length: int,
              device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """The teacher of ``spec`` fine-tuned on ``records`` (SFT; or distilled from ``finetune.teacher``), cached."""
    from tunelab.models import zoo

    key = cache_key(spec, records, template, max_length)
    path = tunelab_home() / "distill" / "teachers" / key
    if (path / "config.json").is_file():
        return zoo.load(str(path), progress=False)
    model, tokenizer = load_model(spec)
    guide = None
    if spec.finetune.teacher is not None:
        guide = finetuned(spec.finetune.teacher, records, template, max_length, device) \
            if spec.finetune.teacher.finetune else load_model(spec.finetune.teacher)
        check_vocabulary(tokenizer, guide[1], model, guide[0], spec.finetune.teacher.model)
        guide = freeze(guide[0].to(device))
    logger.info("fine-tuning teacher %s for %d steps (cached as %s)", spec.model, spec.finetune.max_steps, path)
    _sft(model.to(device), tokenizer, records, spec, template, max_length, guide)
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


def _sft(model: nn.Module, tokenizer: Any, records: Sequence[dict], spec: TeacherSpec, template: str,
         max_length: int, guide: nn.Module | None) -> None:
    """A plain AdamW loop (own RNG, global RNG untouched): CE, or ½ CE + ½ KL(guide ‖ model)."""
    from tunelab.data.collate import SFTCollator
    from tunelab.distill import losses

    options = spec.finetune
    collate = SFTCollator(tokenizer, max_length=max_length, template=template)
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
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            labels = batch["labels"][:, 1:]
            loss = losses.hard_label_ce(out.logits[:, :-1], labels)
            if guide is not None:
                with torch.no_grad():
                    guide_logits = guide(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                kd = losses.forward_kl(out.logits[:, :-1], guide_logits[:, :-1], mask=losses.mask_from_labels(labels))
                loss = losses.mix_with_hard_labels(loss, kd, 0.5)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    freeze(model)


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


