"""The training loop: one readable step loop for every objective, resumable bit for bit.

Each optimizer step, top to bottom::

    for micro in range(grad_accum):                     # gradient accumulation
        batch  = collate([records[i] for i in sampler.next_indices()])
        out    = objective.loss(model, batch)           # LossOutput(loss, metrics)
        accelerator.backward(out.loss)                  # divides by grad_accum, scales under fp16
    grad_norm = clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step(); scheduler.step(); optimizer.zero_grad()
    then: log every `log_every` (loss + the objective's metrics), evaluate every `eval_every`,
    checkpoint every `save_every`, and all three at the last step.

The loop knows no objective by name: SFT, classification, distillation or DPO differ only in the
:class:`~tunelab.train.objective.Objective` passed in. The engine (:mod:`tunelab.train.engine`) owns the
Accelerator, AdamW over the model's trainable parameters *and* the objective's modules, the schedule
and the checkpoint; the sampler (:mod:`tunelab.train.samplers`) owns the data order.

Exact resume: the loss at a step is a function of the trainable weights, the batch and the dropout
masks. A checkpoint (:mod:`tunelab.train.checkpoint`) stores the weights, the optimizer and scheduler
state, the data position and every RNG state, taken *after* everything that happens at its step; a
resumed run restores all of it as its last act before the next step, so steps ``s+1 ...`` repeat
exactly. A fresh run seeds every generator with ``config.seed`` at the same point.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, send_to_device
from torch import nn

from tunelab.errors import ConfigError, DataError
from tunelab.train import checkpoint as ckpt
from tunelab.train import engine
from tunelab.train.config import TrainConfig
from tunelab.train.engine import build_param_groups, resolve_mixed_precision  # noqa: F401  (public here too)
from tunelab.train.objective import BaseObjective, FunctionObjective, LossOutput, as_loss_output, is_objective
from tunelab.train.profile import count_tokens, peak_rss_mb, tokens_per_second
from tunelab.train.samplers import EpochSampler, Sampler
from tunelab.utils import seed_everything

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], "torch.Tensor | LossOutput"]
Callback = Callable[[dict[str, Any]], "bool | None"]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        history: every metrics event, as in ``metrics.jsonl`` (train lines and eval lines).
        steps: optimizer steps completed (including those before a resume).
        train_seconds: time inside optimizer steps (forward, backward, update), summed over sessions;
            evaluation and checkpoint writes are not counted.
        tokens_per_second: non-padding training tokens / ``train_seconds``.
        final_eval_loss: eval loss at the end, or ``None`` without eval records.
        peak_rss_mb: peak resident memory of the process (MiB), ``None`` where unavailable.
        final_loss: the last logged training loss.
        stopped_early: a callback asked to stop before ``max_steps``.
    """

    history: list[dict[str, Any]]
    steps: int
    train_seconds: float
    tokens_per_second: float
    final_eval_loss: float | None
    peak_rss_mb: float | None
    final_loss: float | None = None
    stopped_early: bool = False


@dataclass
class RunState:
    """Counters that a checkpoint carries so that a resumed run continues its clocks and log windows."""

    step: int = 0
    elapsed_s: float = 0.0  # wall time including eval and saves, across sessions
    train_seconds: float = 0.0
    tokens: int = 0
    window_loss: float = 0.0  # sum of per-step losses since the last train log line
    window_steps: int = 0
    window_tokens: int = 0
    window_seconds: float = 0.0
    window_metrics: dict[str, float] = field(default_factory=dict)  # sums of the objective's metrics


# ----------------------------------------------------------------------------- set-up helpers
def default_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """``model(**batch).loss`` — the Hugging Face convention when the batch carries ``labels``."""
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise DataError("model(**batch) returned no loss; use a collator that adds 'labels' or pass loss_fn")
    return loss


def _check_records(train_records: Sequence[Any], eval_records: Sequence[Any] | None) -> None:
    if not hasattr(train_records, "__getitem__") or not hasattr(train_records, "__len__"):
        raise DataError("train_records must be a list (or Sequence) of records; wrap an iterator in list()")
    if len(train_records) == 0:
        raise DataError(
            "train_records is empty; pass at least one record (check the data source and filters)"
        )
    if eval_records is not None and len(eval_records) == 0:
        raise DataError("eval_records is empty; pass None to skip evaluation or provide records")


def evaluate_loss(
    model: nn.Module,
    records: Sequence[Any],
    collate_fn: Callable[[list[Any]], Any],
    loss_fn: LossFn | BaseObjective = default_loss,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Mean loss over consecutive batches of ``records``, in eval mode without gradients.

    ``loss_fn`` is ``(model, batch) -> tensor | LossOutput`` or an objective (its ``loss``). The
    model's train/eval mode is restored afterwards.
    """
    compute = loss_fn.loss if is_objective(loss_fn) else loss_fn
    was_training, losses = model.training, []
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                batch = collate_fn(list(records[start : start + batch_size]))
                batch = send_to_device(batch, device) if device is not None else batch
                losses.append(as_loss_output(compute(model, batch)).loss.float().item())
                if max_batches is not None and len(losses) >= max_batches:
                    break
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- the session
@dataclass
class _Session:
    """Everything one call of :func:`train` works with; its methods are the steps of the loop."""

    accelerator: Accelerator
    model: nn.Module  # as prepared by Accelerate (a DDP wrapper under `accelerate launch`)
    optimizer: torch.optim.Optimizer  # the raw AdamW (state_dict / load_state_dict)
    prepared_optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: Sampler
    config: TrainConfig
    train_records: Sequence[Any]
    eval_records: Sequence[Any] | None
    collate_fn: Callable[[list[Any]], Any]
    objective: BaseObjective
    eval_fn: Callable[[nn.Module], dict[str, float]] | None
    callbacks: Sequence[Callback]
    metrics: ckpt.MetricsLog
    output_dir: Path | None
    run: RunState = field(default_factory=RunState)
    session_start: float = field(default_factory=time.perf_counter)
    elapsed_at_start: float = 0.0
    stop_requested: bool = False

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def modules(self) -> list[nn.Module]:
        return list(self.objective.modules())

    def elapsed(self) -> float:
        return self.elapsed_at_start + time.perf_counter() - self.session_start

    def train_step(self) -> tuple[float, float, int, dict[str, float]]:
        """One optimizer step over ``grad_accum`` micro-batches -> (mean loss, grad norm, tokens, metrics)."""
        config, accelerator = self.config, self.accelerator
        total_loss, tokens, metric_sums = 0.0, 0, {}
        for _ in range(config.grad_accum):
            indices = self.sampler.next_indices()
            batch = self.collate_fn([self.train_records[i] for i in indices])
            batch = send_to_device(batch, accelerator.device)
            tokens += count_tokens(batch)
            with accelerator.accumulate(self.model):  # DDP syncs gradients only on the last micro-batch
                out = as_loss_output(self.objective.loss(self.model, batch))
                accelerator.backward(out.loss)  # loss / grad_accum
            total_loss += out.loss.detach().float().item()
            for name, value in out.metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
        engine.average_module_grads(self.modules, accelerator)  # DDP averages only the model's gradients
        mean_loss = total_loss / config.grad_accum
        if not math.isfinite(mean_loss):  # stop before the update spoils the weights
            raise ConfigError(
                f"training loss became {mean_loss} at step {self.run.step + 1}; lower learning_rate or set max_grad_norm"
            )
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or math.inf)
        self.prepared_optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update, no schedule tick
            self.scheduler.step()
        self.prepared_optimizer.zero_grad(set_to_none=True)
        step_metrics = {name: total / config.grad_accum for name, total in metric_sums.items()}
        return mean_loss, float(grad_norm) if grad_norm is not None else float("nan"), tokens, step_metrics

    def notify(self, record: dict[str, Any]) -> None:
        """Append a metrics event and hand it to the callbacks; a callback returning True stops training."""
        self.metrics.append(record)
        for callback in self.callbacks:
            if callback(record):
                self.stop_requested = True

    def log_train(self, lr: float, grad_norm: float) -> None:
        run, accelerator = self.run, self.accelerator
        loss = run.window_loss / run.window_steps
        extra = {name: total / run.window_steps for name, total in run.window_metrics.items()}
        tokens = run.window_tokens
        if accelerator.num_processes > 1:  # mean over processes (each saw its own micro-batches)
            loss, extra, tokens = _over_processes(loss, extra, tokens)
        self.notify(
            {
                "step": run.step,
                "loss": loss,
                **extra,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_second(tokens, run.window_seconds),
                "elapsed_s": round(self.elapsed(), 3),
            }
        )
        run.window_loss, run.window_steps, run.window_tokens, run.window_seconds = 0.0, 0, 0, 0.0
        run.window_metrics = {}

    def evaluate(self) -> None:
        """Evaluate on the main process only; under DDP the other ranks wait and receive its record.

        Under FSDP every rank must join each forward (it gathers the sharded weights), so all evaluate
        and the main process's record is the one kept."""
        sharded = self.accelerator.distributed_type == DistributedType.FSDP
        record = self._evaluate_here(sharded) if self.accelerator.is_main_process or sharded else None
        if self.accelerator.num_processes > 1:
            record = broadcast_object_list([record])[0]
        self.notify(record)

    def _evaluate_here(self, sharded: bool = False) -> dict[str, Any]:
        config = self.config
        # under DDP the bare module: a forward on one rank must not wait for the others
        model = self.model if self.accelerator.num_processes == 1 or sharded else self.unwrapped
        eval_loss = evaluate_loss(
            model,
            self.eval_records,
            self.collate_fn,
            self.objective,
            batch_size=config.eval_batch_size or config.batch_size,
            max_batches=config.max_eval_batches,
            device=self.accelerator.device,
        )
        record = {"step": self.run.step, "eval_loss": eval_loss}
        if self.eval_fn is not None:
            self.model.eval()
            record.update(self.eval_fn(self.unwrapped))
            self.model.train()
        record["elapsed_s"] = round(self.elapsed(), 3)
        return record

    def sync_stop(self) -> None:
        """Under DDP, a stop asked by a callback on any rank stops every rank (none is left waiting)."""
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(self.stop_requested)], device=self.accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.stop_requested = bool(flag.item())

    def save(self) -> None:
        """Write the checkpoint (main process), after everything else at this step — RNG included."""
        # every rank gathers (FSDP shards are collected here); the main one writes
        trainable = engine.trainable_state(self.unwrapped, self.modules) if self.output_dir is not None else None
        if self.output_dir is not None and self.accelerator.is_main_process:
            self.run.elapsed_s = self.elapsed()
            ckpt.save_checkpoint(
                self.output_dir,
                trainable=trainable,
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                state={
                    "step": self.run.step,
                    "data": self.sampler.state_dict(),
                    "run": asdict(self.run),
                    "config": self.config.model_dump(mode="json"),
                    "trainable_names": list(trainable),
                },
                objective_state=self.objective.state_dict() or None,
            )
        self.accelerator.wait_for_everyone()

    def after_step(self, lr: float, grad_norm: float) -> None:
        """Log, evaluate and checkpoint when due; all three at the last step."""
        config, step = self.config, self.run.step
        if step % config.log_every == 0 or step == config.max_steps:
            self.log_train(lr, grad_norm)
        self.sync_stop()
        last = step == config.max_steps or self.stop_requested
        if self.eval_records is not None and (last or (config.eval_every and step % config.eval_every == 0)):
            self.evaluate()
            self.sync_stop()
        last = last or self.stop_requested
        if last or (config.save_every and step % config.save_every == 0):
            self.save()

    def restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """Continue from ``checkpoint``; the RNG states are restored last, just before the next step."""
        model_state, modules_state = engine.split_trainable_state(checkpoint.trainable)
        ckpt.load_trainable_state(self.unwrapped, model_state, source=str(checkpoint.path))
        engine.load_module_state(self.modules, modules_state, source=str(checkpoint.path))
        try:
            self.optimizer.load_state_dict(checkpoint.optimizer)
        except ValueError as error:
            raise ConfigError(
                f"{checkpoint.path}: optimizer state does not fit ({error}); resume with the same param_groups and weight_decay"
            ) from None
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.sampler.load_state_dict(checkpoint.state["data"])
        if checkpoint.objective is not None:
            self.objective.load_state_dict(checkpoint.objective)
        self.run = RunState(**checkpoint.state["run"])
        self.elapsed_at_start = self.run.elapsed_s
        changed = sorted(
            k
            for k, v in self.config.model_dump(mode="json").items()
            if checkpoint.state["config"].get(k) != v
        )
        if changed:
            logger.warning(
                "resuming with changed options %s: the run will not match an uninterrupted one", changed
            )
        logger.info("resuming from %s at step %d", checkpoint.path, checkpoint.step)
        ckpt.restore_rng_state(checkpoint.rng)


# ----------------------------------------------------------------------------- train
def train(
    model: nn.Module,
    train_records: Sequence[Any],
    objective: BaseObjective | Callable[[list[Any]], Any],
    config: TrainConfig | dict[str, Any],
    sampler: Sampler | None = None,
    *,
    eval_records: Sequence[Any] | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    tokenizer: Any = None,
    labels: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    param_groups: Sequence[dict[str, Any]] | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` (and of the objective's modules) on ``train_records``.

    Args:
        model: any ``nn.Module``; only parameters with ``requires_grad=True`` are optimised and saved.
        train_records: a list (Sequence) of records.
        objective: an :class:`~tunelab.train.objective.Objective` — or, in the original call style, a
            ``collate_fn`` (``list[record] -> batch``), optionally with ``loss_fn``.
        config: a :class:`TrainConfig` or a mapping of its fields.
        sampler: which records form each batch (:mod:`tunelab.train.samplers`); default: an
            :class:`EpochSampler` over all records with ``config.batch_size`` and ``config.seed``.
        eval_records: records for the mean eval loss every ``eval_every`` steps and at the end.
        output_dir: where ``metrics.jsonl``, ``checkpoint/`` and ``trainable.safetensors`` go; None
            keeps everything in memory.
        resume: continue from ``output_dir/checkpoint`` when there is one (a fresh start otherwise).
            Without ``resume`` an existing checkpoint and metrics log in ``output_dir`` are replaced.
        tokenizer, labels: passed to ``objective.collator`` (unless it already built its collator).
        loss_fn: with a collate function only: ``(model, batch) -> tensor | LossOutput``.
        param_groups: optimizer groups as for ``torch.optim`` (e.g. per-group ``lr`` for LoRA+);
            trainable parameters not listed join the default groups.
        progress: show a progress bar (steps, loss, the objective's metrics, ETA) on stderr.
        callbacks: called with every metrics event (a dict); returning True stops training after the
            current step (evaluated and checkpointed as the last one).
        eval_fn: ``model -> {metric: value}`` task metrics added to each eval event.

    Returns:
        A :class:`TrainResult`. The model is left in eval mode, on the accelerator's device, with its
        trained weights.

    Raises:
        DataError: empty records, or a batch from which the model computes no loss.
        ConfigError: invalid config, no trainable parameters, bad param_groups, a checkpoint that does
            not fit the model, or a loss that became NaN / inf.
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config)
    _check_records(train_records, eval_records)
    if resume and output_dir is None:
        raise ConfigError("resume=True needs an output_dir holding the checkpoint; pass output_dir")
    if not is_objective(objective):
        if not callable(objective):
            raise ConfigError("train() takes an Objective or a collate function as its third argument")
        objective = FunctionObjective(objective, loss_fn)
    elif loss_fn is not None:
        raise ConfigError("loss_fn goes with a collate function; an objective computes its own loss")
    collate_fn = getattr(objective, "collate_fn", None) or objective.collator(tokenizer, labels)
    output_dir = Path(output_dir) if output_dir is not None else None
    unused = bool(getattr(objective, "find_unused_parameters", False))  # DDP looks for gradient-less parameters
    accelerator = engine.make_accelerator(resolve_mixed_precision(config.mixed_precision), config.grad_accum,
                                          find_unused_parameters=unused)
    objective.setup(model, accelerator)
    optimizer, scheduler = engine.build_optimizer(model, config, param_groups, objective.modules())
    prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
    engine.broadcast_modules(objective.modules(), accelerator)  # every rank starts from rank 0's modules
    main = accelerator.is_main_process
    if sampler is None:
        sampler = objective.sampler(train_records, config, accelerator.process_index, accelerator.num_processes)
    if sampler is None:
        sampler = EpochSampler(len(train_records), config.batch_size, config.seed,
                               rank=accelerator.process_index, world_size=accelerator.num_processes)
    session = _Session(
        accelerator=accelerator,
        model=prepared_model,
        optimizer=optimizer,
        prepared_optimizer=prepared_optimizer,
        scheduler=scheduler,
        sampler=sampler,
        config=config,
        train_records=train_records,
        eval_records=eval_records,
        collate_fn=collate_fn,
        objective=objective,
        eval_fn=eval_fn,
        callbacks=list(callbacks or []),
        metrics=ckpt.MetricsLog(output_dir / "metrics.jsonl" if output_dir is not None and main else None),
        output_dir=output_dir,
    )
    try:
        _start(session, resume)
        _run_loop(session, progress and main)
        if output_dir is not None:
            trainable = engine.trainable_state(session.unwrapped)  # every rank: FSDP gathers its shards
            if main:
                ckpt.save_trainable(session.unwrapped, output_dir / "trainable.safetensors", tensors=trainable)
    finally:
        accelerator.unwrap_model(prepared_model, keep_fp32_wrapper=False)  # drop the autocast wrapper
        model.eval()
    return _result(session)


def _over_processes(loss: float, extra: dict[str, float], tokens: int) -> tuple[float, dict[str, float], int]:
    """Mean loss and metrics over the processes (a metric only some ranks logged: their mean); tokens summed."""
    parts = gather_object([(loss, extra, tokens)])  # one entry per rank
    names = dict.fromkeys(name for _, metrics, _ in parts for name in metrics)
    means = {name: sum(m[name] for _, m, _ in parts if name in m) / sum(name in m for _, m, _ in parts)
             for name in names}
    return sum(p[0] for p in parts) / len(parts), means, sum(p[2] for p in parts)


def _start(session: _Session, resume: bool) -> None:
    """Restore the checkpoint (``resume``) or start fresh: clean run directory, seeded generators."""
    output_dir = session.output_dir
    checkpoint = ckpt.load_checkpoint(output_dir) if resume else None
    if checkpoint is not None:
        session.restore(checkpoint)
        session.metrics.restart(keep_through_step=checkpoint.step)
        return
    if resume:
        logger.info("no checkpoint in %s; starting fresh", output_dir)
    if output_dir is not None and session.accelerator.is_main_process and ckpt.find_checkpoint(output_dir):
        logger.info("replacing the previous run's checkpoint in %s (resume=False)", output_dir)
        ckpt.remove_checkpoint(output_dir)
    session.metrics.restart(keep_through_step=None)
    seed_everything(session.config.seed)


def _run_loop(session: _Session, show_progress: bool) -> None:
    config, run = session.config, session.run
    session.model.train()
    with engine.progress_bar(show_progress) as bar:
        task = bar.add_task("train", total=config.max_steps, completed=run.step, loss="-", postfix="")
        while run.step < config.max_steps and not session.stop_requested:
            lr = session.optimizer.param_groups[0]["lr"]  # the rate this step uses
            started = time.perf_counter()
            loss, grad_norm, tokens, step_metrics = session.train_step()
            seconds = time.perf_counter() - started
            run.step += 1
            run.train_seconds += seconds
            run.tokens += tokens
            run.window_loss += loss
            run.window_steps += 1
            run.window_tokens += tokens
            run.window_seconds += seconds
            for name, value in step_metrics.items():
                run.window_metrics[name] = run.window_metrics.get(name, 0.0) + value
            session.after_step(lr, grad_norm)
            bar.update(task, completed=run.step, loss=f"{loss:.4f}", postfix=engine.format_postfix(step_metrics))


def _result(session: _Session) -> TrainResult:
    history = session.metrics.records
    eval_losses = [r["eval_loss"] for r in history if "eval_loss" in r]
    train_losses = [r["loss"] for r in history if "loss" in r]
    run = session.run
    return TrainResult(
        history=list(history),
        steps=run.step,
        train_seconds=run.train_seconds,
        tokens_per_second=tokens_per_second(run.tokens, run.train_seconds),
        final_eval_loss=eval_losses[-1] if eval_losses else None,
        peak_rss_mb=peak_rss_mb(),
        final_loss=train_losses[-1] if train_losses else None,
        stopped_early=session.stop_requested and run.step < session.config.max_steps,
    )
