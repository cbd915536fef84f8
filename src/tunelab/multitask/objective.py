"""The ``multitask`` objective: several tasks on one backbone, each with its head (and adapters).

Per step (see :mod:`tunelab.train.loop`), a batch of one task (``switching: batch``, the sampler draws
a task per batch) or of many (``switching: example``, a task per row) is run with each row's adapter
chain (:mod:`~tunelab.multitask.sharing`) and head; the per-task losses

    L_i = loss of task i's head on its rows          (SFT loss for generation tasks: LM head, response tokens)

are combined by the configured weighting (:mod:`tunelab.multitask.weighting`) into the loss the loop
backpropagates. Task sampling is :class:`~tunelab.train.samplers.GroupSampler` (proportional, uniform,
temperature, annealed; resumable), returned from :meth:`MultitaskObjective.sampler`.

The heads live on the model object (not as a sub-module: a plain attribute), so a later stage's
``multitask`` objective finds and extends them: listing a new task and ``train_tasks: [new]`` adds a
task (adapter + head) to a trained model while the old ones stay frozen. Being no parameters of the
model, they are not in its adapters: ``save_outputs`` writes them beside the adapters of a run
(``runs/<n>/adapters/<run>/heads/``: ``heads.safetensors``, ``heads.json`` = task -> head kind, size and
label names, ``multitask.json`` = the tasks, sharing and trained tasks), and :func:`load_heads` puts
them back on a model for inference::

    model, tokenizer = zoo.load(base)
    tuners.load(model, "runs/mt/adapters/lora-n16-s0")
    heads = load_heads(model, "runs/mt/adapters/lora-n16-s0")
    objective = MultitaskObjective(saved_options("runs/mt/adapters/lora-n16-s0"))
    objective.collator(tokenizer, None)
    objective.evaluate(model, records)          # or heads(model, batch, task="domain").logits

``multitask`` loads a decoder with its LM head (generation + understanding); ``multitask_encoder``
loads an encoder (MiniLM, BERT) for understanding tasks only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab import tuners
from tunelab.errors import ConfigError, DataError, ModelError
from tunelab.models.heads import HEADS_CONFIG, HeadOutput, TaskHeads, row_weighted_loss, save_heads
from tunelab.models.heads import load_heads as read_heads
from tunelab.multitask import sharing as sharing_lib
from tunelab.multitask.collate import (
    MultitaskCollator,
    block_batch,
    block_widths,
    task_blocks,
    task_collator,
)
from tunelab.multitask.evaluate import evaluate_generation, evaluate_head_task
from tunelab.multitask.routing import routable, row_adapters
from tunelab.multitask.tasks import TaskSpec, check_unique, group_records
from tunelab.multitask.weighting import build_weighting, check_weighting
from tunelab.train.objective import BaseObjective, LossOutput, ObjectiveConfig
from tunelab.train.samplers import GROUP_STRATEGIES, GroupSampler
from tunelab.utils import atomic_write_json

# mixed_forward: auto runs task blocks when they hold at most this share of the batch's B x T positions:
# below ~10% savings the extra forwards of small blocks cost about what the padding does
# (benchmarks/multitask_step_time.py: blocks 1.12-1.15x vs routed 1.04x at equal lengths with hard sharing)
BLOCKS_PAY = 0.85


def blocks_pay(batch: dict[str, Any], blocks: list[tuple[str, int, int]], widths: list[int]) -> bool:
    """``mixed_forward: auto``'s test: the task blocks run ``Σ_t n_t × width_t`` positions, at most
    ``BLOCKS_PAY`` of the ``B × T`` of one forward of the whole batch."""
    positions = sum((stop - start) * width for (_, start, stop), width in zip(blocks, widths, strict=True))
    return positions <= BLOCKS_PAY * batch["attention_mask"].numel()

HEADS_ATTRIBUTE = "_tunelab_multitask_heads"
HEADS_FOLDER = "heads"  # beside the adapters: heads.safetensors + heads.json (tunelab.models.heads) + OPTIONS_FILE
OPTIONS_FILE = "multitask.json"


class MultitaskOptions(ObjectiveConfig):
    """Options of the ``multitask`` objective (``objective.options``)."""

    tasks: list[TaskSpec] = Field(..., min_length=1, description="The tasks (name, kind, record filter, labels, group).")
    sharing: Literal["hard", "per_task", "hierarchical"] = Field(
        "hard", description="hard: shared backbone/adapter; per_task: an adapter per task; hierarchical: "
        "shared + group + task adapters stacked.")
    switching: Literal["batch", "example"] = Field(
        "batch", description="batch: one task per batch; example: mixed batches, each row its own adapters and head.")
    sampling: Literal[GROUP_STRATEGIES] = Field("proportional", description="Task sampling: proportional, "
                                                "uniform, temperature (p ∝ n^(1/T)), annealed (proportional -> uniform).")
    temperature: float = Field(2.0, gt=0, description="T of temperature sampling.")
    min_alpha: float = Field(0.0, ge=0, le=1, description="Floor of the annealed exponent (0 = ends uniform).")
    weighting: str = Field("equal", description="Loss weighting: equal, static, uncertainty, dwa, gradnorm, pcgrad.")
    weighting_options: dict[str, Any] = Field(default_factory=dict, description="Options of the weighting.")
    train_tasks: list[str] | None = Field(None, description="Tasks that train (and are scored); default all. "
                                          "One task = its single-task baseline; new tasks only = adding tasks.")
    freeze_shared: bool = Field(False, description="Freeze the shared backbone/adapter (e.g. when adding a task).")
    head_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before each head's projection.")
    mixed_forward: Literal["auto", "blocks", "routed"] = Field(
        "auto", description="How a mixed batch runs (switching: example). blocks: one forward per task block "
        "(the sampler orders rows by task), each cut to its own longest row; routed: one forward of the whole "
        "batch, adapters routed per row; auto: blocks when that drops at least 15% of the batch's padded "
        "positions or the adapters cannot be routed (prompt methods), else routed. Same losses and gradients; "
        "blocks falls back to routed when a task's rows are scattered or under DDP.")

    @model_validator(mode="after")
    def _check(self) -> MultitaskOptions:
        try:
            check_unique(self.tasks)
            check_weighting(self.weighting, self.weighting_options)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        names = [t.name for t in self.tasks]
        unknown = sorted(set(self.train_tasks or []) - set(names))
        if unknown:
            raise ValueError(f"train_tasks: unknown task {unknown[0]!r}; tasks: {', '.join(names)}")
        if self.train_tasks is not None and not self.train_tasks:
            raise ValueError("train_tasks is empty; list at least one task or leave it out (all tasks)")
        return self

    @property
    def trained(self) -> list[str]:
        return list(self.train_tasks) if self.train_tasks is not None else [t.name for t in self.tasks]


def attached_heads(model: nn.Module) -> TaskHeads | None:
    """The multi-task heads carried by ``model`` (None before the first multitask stage)."""
    return getattr(getattr(model, "module", model), HEADS_ATTRIBUTE, None)


def attach_heads(model: nn.Module, heads: TaskHeads) -> None:
    object.__setattr__(model, HEADS_ATTRIBUTE, heads)  # a plain attribute: not a sub-module of the model


class MultitaskObjective(BaseObjective):
    """``multitask``: tasks on one backbone with per-task heads, a sharing structure, sampling and weighting."""

    config_class = MultitaskOptions
    model_task = "causal_lm"
    label_key = None
    # per-task adapters switched per batch (or rows of one task missing from a rank's share) and, on an
    # encoder, the model's own token classifier leave trainable model parameters without gradient
    find_unused_parameters = True

    def __init__(self, config: MultitaskOptions | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.tasks = {t.name: t for t in self.config.tasks}
        self.trained = self.config.trained
        self.weighting = build_weighting(self.config.weighting, self.trained, self.config.weighting_options)
        self.heads: TaskHeads | None = None
        self.shared: list[nn.Parameter] = []
        self.template = "plain"
        self.task_collators: dict[str, Callable] = {}

    # --- data
    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 256,
                      template: str = "plain", **_: Any) -> Callable:
        self.template = template
        self.task_collators = {t.name: task_collator(t, tokenizer, max_length, template) for t in self.config.tasks}
        return MultitaskCollator(self.config.tasks, tokenizer, max_length=max_length, template=template)

    # --- model
    def setup(self, model: nn.Module, accelerator: Any) -> None:
        """Heads for every task (kept on the model), adapters of the sharing structure, what trains."""
        self.heads = prepare(model, self.config)
        self.shared = sharing_lib.shared_parameters(model, self.config.sharing, self.config.tasks, self.trained)
        super().setup(model, accelerator)

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.heads, self.weighting) if m is not None]

    def sampler(self, records: Sequence[Any], config: Any, rank: int = 0, world_size: int = 1) -> GroupSampler:
        groups = group_records(self.config.tasks, records)
        groups = {name: rows[: self.tasks[name].max_records] for name, rows in groups.items()}
        empty = [name for name in self.trained if not groups[name]]
        if empty:
            task = self.tasks[empty[0]]
            raise DataError(f"task {task.name!r} has no training records (filter {task.match}); check data.tasks "
                            "or the task's match")
        return GroupSampler([groups[name] for name in self.trained], config.batch_size, config.seed,
                            strategy=self.config.sampling, temperature=self.config.temperature,
                            total_steps=config.max_steps * config.grad_accum, min_alpha=self.config.min_alpha,
                            mixed=self.config.switching == "example", rank=rank, world_size=world_size)

    def chain(self, model: nn.Module, task: str) -> list[str]:
        return sharing_lib.chain(self.config.sharing, self.tasks[task], model)

    def activate(self, model: nn.Module, task: str) -> None:
        """Per-batch switching: run ``task``'s adapters (its head is chosen by name in the forward)."""
        model = getattr(model, "module", model)
        names = [name for name in self.chain(model, task) if name in tuners.adapters(model)]
        if names and tuners.active_adapters(model) != names:
            tuners.set_active(model, names)

    def forward(self, model: nn.Module, batch: dict[str, Any]):
        """Heads' output for a batch with a task per row (``batch["tasks"]``), routed per row if needed."""
        heads = self.heads or attached_heads(model)
        names = list(batch["tasks"])
        inner = getattr(model, "module", model)
        unique = list(dict.fromkeys(names))
        chains = {name: self.chain(inner, name) for name in unique}
        task = unique[0] if len(unique) == 1 else names
        mode = self.config.mixed_forward
        blocks = task_blocks(names) if len(unique) > 1 and mode != "routed" else None
        if blocks and inner is model and isinstance(batch.get("attention_mask"), torch.Tensor):
            widths = block_widths(batch, blocks)
            if mode == "blocks" or blocks_pay(batch, blocks, widths) or not routable(inner):
                return self._forward_blocks(model, heads, batch, blocks, widths)
        if len({tuple(c) for c in chains.values()}) == 1:
            self.activate(inner, unique[0])
            return heads(model, batch, task=task)
        with row_adapters(inner, [chains[name] for name in names]):
            return heads(model, batch, task=task)

    def _forward_blocks(self, model: nn.Module, heads: TaskHeads, batch: dict[str, Any],
                        blocks: list[tuple[str, int, int]], widths: list[int]) -> HeadOutput:
        """A mixed batch as one forward per task block ``rows start:stop``, with the task's adapters active
        and the block cut to its own longest row (:func:`~tunelab.multitask.collate.block_batch`):

            L_t = loss of task t's head on block t          (as in one routed forward of the whole batch)
            loss = Σ_t n_t L_t / Σ_t n_t

        The same arithmetic as routing each row (per-row adapters, per-task heads and losses; one backward
        and one optimizer step over all blocks), without padding short rows to the batch's longest task
        and without per-row routing inside the layers. ``hidden_states`` is None (blocks differ in length).
        """
        logits, losses, rows = {}, {}, {}
        for (name, start, stop), width in zip(blocks, widths, strict=True):
            self.activate(model, name)
            out = heads(model, block_batch(batch, name, start, stop, width), task=name)
            logits[name], rows[name] = out.logits, torch.arange(start, stop, device=out.logits.device)
            if name in out.losses:
                losses[name] = out.losses[name]
        return HeadOutput(logits=logits, loss=row_weighted_loss(losses, rows), losses=losses, rows=rows,
                          hidden_states=None)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        out = self.forward(model, batch)
        losses = {name: loss for name, loss in out.losses.items() if name in self.trained}
        if not losses:  # an evaluation batch of frozen tasks only
            return LossOutput(torch.stack(list(out.losses.values())).mean())
        shared = self.shared if self.weighting.needs_gradients and torch.is_grad_enabled() else ()
        result = self.weighting.combine(losses, shared)
        result.metrics.update({f"loss/{name}": float(loss.detach()) for name, loss in losses.items()})
        return result

    # --- evaluation and state
    def evaluate(self, model: nn.Module, records: Sequence[Any], max_new_tokens: int = 32, batch_size: int = 32,
                 progress: bool = True, **_: Any) -> dict[str, float]:
        """``<task>/<metric>`` for every task trained so far, ``score`` = their mean, parameters per task."""
        heads = self.heads or attached_heads(model)
        if heads is None:  # an untrained model (the runner's untuned baseline): fresh heads, not kept
            heads = fresh_heads(model, self.config)
        model.eval()
        groups = group_records(self.config.tasks, records)
        scored = getattr(heads, "trained_tasks", None) or set(self.trained)
        results: dict[str, float] = {}
        for task in self.config.tasks:
            if task.name not in scored or not groups[task.name]:
                continue
            subset = [records[i] for i in groups[task.name]]
            self.activate(model, task.name)
            if task.kind == "generation":
                scores = evaluate_generation(model, self.tokenizer, task, subset, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, template=self.template, progress=progress)
            else:
                scores = evaluate_head_task(model, heads, task, subset, self.task_collators[task.name], batch_size)
            results.update({f"{task.name}/{key}": value for key, value in scores.items()})
        task_scores = [value for key, value in results.items() if key.endswith("/score")]
        if not task_scores:
            raise DataError("no test record matches a trained task of the multitask objective; check data.tasks")
        own = sharing_lib.parameters_per_task(model, self.config.sharing, self.config.tasks, heads)
        results.update({f"{name}/own_parameters": float(count) for name, count in own.items() if name in scored})
        results["score"] = sum(task_scores) / len(task_scores)
        return results

    def state_dict(self) -> dict[str, Any]:
        return {"weighting": self.weighting.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weighting.load_extra_state(state.get("weighting", {}))

    def save_outputs(self, model: nn.Module, directory: Path) -> dict[str, Path]:
        """The heads on ``model`` (every task's, trained in this stage or before) into ``directory/heads``."""
        heads = attached_heads(model)
        if heads is None:
            return {}
        folder = save_heads(heads, Path(directory) / HEADS_FOLDER)
        info = {"trained_tasks": sorted(getattr(heads, "trained_tasks", None) or self.trained),
                "options": self.config.model_dump(mode="json")}
        atomic_write_json(folder / OPTIONS_FILE, info)
        return {"heads": folder}

    def load_outputs(self, model: nn.Module, directory: Path) -> None:
        """A finished stage of a resumed run: its heads, and the adapters its setup added (their weights
        are restored by the caller, with the rest of the stage's trainable state)."""
        sharing_lib.ensure_adapters(getattr(model, "module", model), self.config.sharing, self.config.tasks)
        if (Path(directory) / HEADS_FOLDER / HEADS_CONFIG).is_file():
            load_heads(model, directory)


class MultitaskEncoderObjective(MultitaskObjective):
    """``multitask_encoder``: the same on an encoder (MiniLM, BERT) for understanding tasks.

    The runner loads the encoder as ``*ForTokenClassification`` (the only encoder model task it knows);
    that model's own ``classifier`` is unused: every task has its head in :class:`TaskHeads`.
    """

    model_task = "token_classification"


def _heads_folder(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    return directory / HEADS_FOLDER if (directory / HEADS_FOLDER / HEADS_CONFIG).is_file() else directory


def load_heads(model: nn.Module, directory: str | os.PathLike) -> TaskHeads:
    """The multi-task heads saved with a run's adapters (``runs/<n>/adapters/<run>``, or its ``heads/``
    folder), attached to ``model`` (extending heads it has) so that the objective finds them.

    Load the adapters first (``tuners.load``); the heads are placed on the model's device.
    """
    folder = _heads_folder(directory)
    if not (folder / HEADS_CONFIG).is_file():
        raise ModelError(f"no multi-task heads in {directory} (no {HEADS_FOLDER}/{HEADS_CONFIG}); was it saved by "
                         "a run with the multitask objective?")
    inner = getattr(model, "module", model)
    existing = attached_heads(inner)
    heads = read_heads(existing if existing is not None else inner, folder)
    info = json.loads((folder / OPTIONS_FILE).read_text()) if (folder / OPTIONS_FILE).is_file() else {}
    heads.trained_tasks = set(info.get("trained_tasks") or heads.heads)
    attach_heads(inner, heads)
    return heads


def saved_options(directory: str | os.PathLike) -> MultitaskOptions:
    """The multitask options (tasks, sharing, ...) the heads in ``directory`` were trained with."""
    path = _heads_folder(directory) / OPTIONS_FILE
    if not path.is_file():
        raise ModelError(f"no {OPTIONS_FILE} in {path.parent}; save the heads with a multitask run")
    return MultitaskOptions.model_validate(json.loads(path.read_text())["options"])


def fresh_heads(model: nn.Module, options: MultitaskOptions) -> TaskHeads:
    """Untrained heads for every task (on ``model``'s device), not attached to the model."""
    heads = TaskHeads.for_model(getattr(model, "module", model))
    for task in options.tasks:
        if task.kind == "generation" and not heads.decoder:
            raise ConfigError(f"task {task.name!r} is a generation task; it needs a decoder with an LM head "
                              "(objective multitask on tiny-llama, ...), not an encoder")
        heads.add_head(task.name, task.head_kind, label_names=task.labels, dropout=options.head_dropout)
    return heads


def prepare(model: nn.Module, options: MultitaskOptions) -> TaskHeads:
    """Heads for ``options.tasks`` (kept on the model, reused across stages), adapters, trainable flags."""
    inner = getattr(model, "module", model)
    heads = attached_heads(inner)
    if heads is None:
        heads = fresh_heads(inner, options)
        heads.trained_tasks = set()
        attach_heads(inner, heads)
    for task in options.tasks:
        if task.name not in heads.heads:
            if task.kind == "generation" and not heads.decoder:
                raise ConfigError(f"task {task.name!r} is a generation task; it needs a decoder with an LM head")
            heads.add_head(task.name, task.head_kind, label_names=task.labels, dropout=options.head_dropout)
        elif heads.specs[task.name].kind != task.head_kind:
            raise ConfigError(f"task {task.name!r} has a {heads.specs[task.name].kind} head already, not {task.head_kind}")
    sharing_lib.ensure_adapters(inner, options.sharing, options.tasks)
    trained = options.trained
    heads.trained_tasks = set(heads.trained_tasks) | set(trained)
    for name, head in heads.heads.items():
        head.requires_grad_(name in trained)
    sharing_lib.set_trainable(inner, options.sharing, options.tasks, trained, options.freeze_shared)
    return heads


def add_task(model: nn.Module, options: MultitaskOptions, task: TaskSpec | dict) -> MultitaskOptions:
    """Add ``task`` (adapter + head) to a model trained with ``options``; only the new task will train.

    Returns the options for the next training stage (old tasks listed, ``train_tasks = [new]``). With
    ``sharing: per_task`` the old tasks' adapters and heads are frozen and untouched, so their outputs stay
    bit-for-bit the same.
    """
    task = task if isinstance(task, TaskSpec) else TaskSpec.model_validate(task)
    new = options.model_copy(update={"tasks": [*options.tasks, task], "train_tasks": [task.name]})
    new = MultitaskOptions.model_validate(new.model_dump())
    prepare(model, new)
    return new
