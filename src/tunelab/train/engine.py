"""The training engine: Accelerator, optimizer, schedule, checkpoints and the progress bar.

Everything here is independent of *what* is trained: the loop (:mod:`tunelab.train.loop`) asks the
objective for batches and losses, and the engine for everything around them.

- **Accelerate** places the model and batches on the device, runs mixed precision (bf16 / fp16
  autocast, a gradient scaler for fp16) and, under ``accelerate launch``, wraps the model for DDP.
- **AdamW** (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019) over the model's
  parameters with ``requires_grad=True`` *and* the trainable parameters of the objective's modules
  (a KD projector, a value head, task heads, a learned loss weight); the learning rate follows
  :mod:`tunelab.train.schedules`.
- **Checkpoints** (:mod:`tunelab.train.checkpoint`) hold the model's trainable tensors and the
  objective modules' (keys ``objective.<i>.<name>``), the objective's own state, the optimizer,
  scheduler, sampler position and every RNG state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedDataParallelKwargs
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.distributed.tensor import DTensor

from tunelab.errors import ConfigError
from tunelab.train.config import TrainConfig
from tunelab.train.schedules import make_scheduler, resolve_warmup_steps

logger = logging.getLogger(__name__)

OBJECTIVE_PREFIX = "objective."


def resolve_mixed_precision(requested: str) -> str:
    """The precision this machine can run: fp16 needs CUDA, bf16 needs CUDA bf16 support or a CPU."""
    if requested == "no":
        return "no"
    if torch.cuda.is_available():
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            logger.warning("this GPU has no bf16 support; training in fp32 (mixed_precision='no') instead")
            return "no"
        return requested
    if requested == "fp16":
        logger.warning("fp16 mixed precision needs a GPU; training in fp32 (mixed_precision='no') instead")
        return "no"
    return requested  # bf16 autocast runs on CPUs


def make_accelerator(mixed_precision: str, grad_accum: int, find_unused_parameters: bool = False) -> Accelerator:
    """An Accelerator for this run (one process-wide state, reset when the precision changes).

    Under DDP (``accelerate launch``, ``torchrun``):

    - ``find_unused_parameters`` comes from the objective (``Objective.find_unused_parameters``): True when
      some trainable *model* parameters may get no gradient in a step (per-task adapters switched per
      batch, a head the objective never calls). Without it DDP waits for those gradients and fails at the
      next step; with it DDP walks the autograd graph after every forward to find them (a small cost).
    - ``broadcast_buffers=False``: DDP's default re-broadcasts rank 0's buffers before *every* forward of
      the wrapper — a collective, so ranks that run a different number of forwards (one replays a buffer
      example and the other does not; sampling stops when a rank's completions are done) would wait for
      each other forever. The buffers of the models tunelab tunes are constants (rotary frequencies,
      position ids), identical on every rank after DDP's initial broadcast; models with running
      statistics (BatchNorm) keep each rank's own.
    """
    # One process may train several models (an experiment grid) with different precisions, so a
    # single-process state is reset when the precision changes.
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, broadcast_buffers=False)
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                       kwargs_handlers=[ddp])


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    param_groups: Sequence[dict[str, Any]] | None = None,
    extra_modules: Sequence[nn.Module] = (),
) -> list[dict[str, Any]]:
    """Optimizer groups over the trainable parameters of ``model`` and of ``extra_modules``.

    ``param_groups`` (e.g. LoRA+'s per-matrix learning rates) are kept as given; trainable parameters
    they leave out join default groups: matrices with ``weight_decay``, vectors (biases, norms,
    learned scalars) without.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    seen = {id(p) for _, p in named}
    for index, module in enumerate(extra_modules):
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                named.append((f"{OBJECTIVE_PREFIX}{index}.{name}", p))
                seen.add(id(p))
    if not named:
        raise ConfigError(
            "the model has no trainable parameters; apply a tuner method or unfreeze some parameters"
        )
    trainable_ids, covered, groups = {id(p) for _, p in named}, set(), []
    for index, group in enumerate(param_groups or []):
        params = list(group.get("params", []))
        for param in params:
            if id(param) not in trainable_ids:
                raise ConfigError(
                    f"param_groups[{index}] holds a frozen or foreign parameter; pass only the model's parameters with requires_grad=True"
                )
            if id(param) in covered:
                raise ConfigError(
                    f"param_groups[{index}] repeats a parameter of an earlier group; put each parameter in one group"
                )
            covered.add(id(param))
        groups.append({**group, "params": params})
    rest = [p for _, p in named if id(p) not in covered]
    if weight_decay > 0:
        groups.append({"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay})
        groups.append({"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0})
    else:
        groups.append({"params": rest, "weight_decay": 0.0})
    return [group for group in groups if group["params"]]


def build_optimizer(
    model: nn.Module,
    config: TrainConfig,
    param_groups: Sequence[dict[str, Any]] | None = None,
    extra_modules: Sequence[nn.Module] = (),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its warmup + decay schedule."""
    optimizer = torch.optim.AdamW(
        build_param_groups(model, config.weight_decay, param_groups, extra_modules),
        lr=config.learning_rate,
        betas=config.adam_betas,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    scheduler = make_scheduler(
        optimizer,
        schedule=config.schedule,
        warmup_steps=resolve_warmup_steps(config.max_steps, config.warmup_steps, config.warmup_ratio),
        total_steps=config.max_steps,
        min_lr_ratio=config.min_lr_ratio,
    )
    return optimizer, scheduler


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: FSDP2 shards parameters as DTensors, gathered here (a collective:
    under FSDP every rank must call this, in the same order)."""
    if isinstance(param, DTensor):
        return param.detach().full_tensor()
    return param.detach()


def trainable_state(model: nn.Module, extra_modules: Sequence[nn.Module] = ()) -> dict[str, torch.Tensor]:
    """Trainable tensors of the model (by name) and of the objective's modules (``objective.<i>.*``).

    Under FSDP the shards are gathered, so every process must call this (the main one writes).
    """
    state = {name: full_tensor(p) for name, p in model.named_parameters() if p.requires_grad}
    for index, module in enumerate(extra_modules):
        for name, p in module.named_parameters():
            if p.requires_grad:
                state[f"{OBJECTIVE_PREFIX}{index}.{name}"] = full_tensor(p)
    return state


def split_trainable_state(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Undo :func:`trainable_state`: ``(model tensors, {module index: tensors})``."""
    model_state, modules_state = {}, {}
    for key, tensor in tensors.items():
        if key.startswith(OBJECTIVE_PREFIX):
            index, _, name = key.removeprefix(OBJECTIVE_PREFIX).partition(".")
            modules_state.setdefault(int(index), {})[name] = tensor
        else:
            model_state[key] = tensor
    return model_state, modules_state


def load_module_state(modules: Sequence[nn.Module], tensors: dict[int, dict[str, torch.Tensor]], source: str) -> None:
    """Copy checkpointed tensors into the objective's modules; the names must match exactly."""
    for index, module in enumerate(modules):
        params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        saved = tensors.get(index, {})
        if params.keys() != saved.keys():
            raise ConfigError(
                f"{source}: the objective's module {index} has other trainable parameters than the checkpoint "
                f"({sorted(params)[:3]} vs {sorted(saved)[:3]}); resume with the same objective options"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name].to(device=param.device, dtype=param.dtype))
    if set(tensors) - set(range(len(modules))):
        raise ConfigError(f"{source} holds objective modules this objective does not have; resume with the same objective")


def broadcast_modules(modules: Sequence[nn.Module], accelerator: Accelerator) -> None:
    """Under data parallelism, copy rank 0's objective modules to every rank.

    DDP broadcasts the *model's* parameters when it wraps it; the objective's modules (a projector, a
    learned loss weight) are not wrapped, so without this each rank would start from its own init.
    """
    if accelerator.num_processes == 1:
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


def average_module_grads(modules: Sequence[nn.Module], accelerator: Accelerator) -> None:
    """Under data parallelism, average the objective modules' gradients over the ranks (DDP does the model's).

    A parameter that got no gradient on any rank keeps ``grad=None`` (AdamW skips it, as in one
    process); one that got a gradient on some ranks only counts zeros from the others, which is
    exactly the mean of the per-rank gradients that DDP would compute.
    """
    if accelerator.num_processes == 1:
        return
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    if not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=accelerator.device)
    torch.distributed.all_reduce(present)  # (num_params,) ranks holding a gradient
    for param, count in zip(params, present.tolist(), strict=True):
        if count == 0:
            continue
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.distributed.all_reduce(grad)
        param.grad = grad / accelerator.num_processes


def progress_bar(enabled: bool) -> Progress:
    """Step counter, bar, loss, the objective's metrics and ETA on stderr (plain off a terminal)."""
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[postfix]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def format_postfix(metrics: dict[str, float], limit: int = 4) -> str:
    """The first few metrics as ``name value`` pairs for the progress bar."""
    return " ".join(f"{name} {value:.4g}" for name, value in list(metrics.items())[:limit])
