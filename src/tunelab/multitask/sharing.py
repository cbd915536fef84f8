"""Sharing structures: which adapters each task runs, which parameters are shared, which train.

Three structures (``objective.options.sharing``), on the model as the experiment's ``method`` left it
(one adapter named ``default``, or full fine-tuning):

- ``hard``: every task runs the same backbone — fully fine-tuned, or with the one shared ``default``
  adapter; each task has its own head. Chain of task ``i``: ``[default]``.
- ``per_task``: one adapter per task (a copy of the ``default`` adapter's method and options — any
  tunelab method), on a frozen backbone; ``default`` itself is dropped. Chain: ``[i]``. Tasks share
  nothing trainable, so adding a task leaves the others' outputs bit-for-bit unchanged.
- ``hierarchical``: the shared ``default`` adapter, then a group adapter ``group_<g>`` per task group
  (``tasks[i].group``, e.g. generation vs understanding, or a domain), then the task's own adapter,
  stacked: all three are active together, their contributions add. Chain: ``[default, group_g, i]``.

Adapters are added with ``tuners.add_adapter`` (the public API) and switched with ``tuners.set_active``
(per batch) or :func:`tunelab.multitask.routing.row_adapters` (per row).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from tunelab import tuners
from tunelab.errors import ConfigError, MethodError
from tunelab.multitask.tasks import TaskSpec

SHARED = "default"


def chain(sharing: str, task: TaskSpec, model: nn.Module) -> list[str]:
    """The adapters task ``task`` runs, in order (empty: the bare model)."""
    names = tuners.adapters(model)
    if sharing == "hard":
        return [SHARED] if SHARED in names else list(names)[:1]
    if sharing == "per_task":
        return [task.name]
    levels = [SHARED] if SHARED in names else []
    if task.group is not None:
        levels.append(f"group_{task.group}")
    return levels + [task.name]


def _template(model: nn.Module, adapter_names: Iterable[str]):
    existing = tuners.adapters(model)
    if not existing:
        raise ConfigError("per-task and hierarchical sharing need an adapter method in the method section "
                          "(lora, bottleneck, ia3, ...); the model has no adapter")
    if SHARED in existing:
        return existing[SHARED]
    task_adapters = [existing[name] for name in adapter_names if name in existing]
    return task_adapters[0] if task_adapters else next(iter(existing.values()))


def ensure_adapters(model: nn.Module, sharing: str, tasks: Sequence[TaskSpec]) -> list[str]:
    """Add the adapters ``sharing`` needs for ``tasks`` (those missing); returns the names added."""
    if sharing == "hard":
        return []
    template = _template(model, [t.name for t in tasks])
    wanted = [t.name for t in tasks]
    if sharing == "hierarchical":
        groups = [f"group_{t.group}" for t in tasks if t.group is not None]
        wanted = list(dict.fromkeys(groups)) + wanted
    added = []
    for name in wanted:
        if name not in tuners.adapters(model):
            try:
                tuners.add_adapter(model, template, name)
            except MethodError as error:
                raise ConfigError(f"sharing {sharing!r} needs one adapter per task: {error}") from None
            added.append(name)
    if sharing == "per_task" and SHARED in tuners.adapters(model):
        tuners.delete_adapter(model, SHARED)  # the template: per-task adapters share nothing
    return added


def _owns(parameter_name: str, adapter: str) -> bool:
    return f".{adapter}." in f".{parameter_name}."


def set_trainable(model: nn.Module, sharing: str, tasks: Sequence[TaskSpec], trained: Sequence[str],
                  freeze_shared: bool = False) -> None:
    """Adapters of the tasks in ``trained`` (and the levels they use) train; the others are frozen.

    Hard sharing leaves the backbone as the method set it (unless ``freeze_shared``).
    """
    if sharing == "hard":
        if freeze_shared:
            model.requires_grad_(False)
        return
    adapters = set(tuners.adapters(model))
    trained_set = set(trained)
    active = {name for t in tasks if t.name in trained_set for name in chain(sharing, t, model)}
    if freeze_shared:
        active.discard(SHARED)
    for name, parameter in model.named_parameters():
        owner = next((a for a in adapters if _owns(name, a)), None)
        if owner is not None:
            parameter.requires_grad_(owner in active)


def shared_parameters(model: nn.Module, sharing: str, tasks: Sequence[TaskSpec],
                      trained: Sequence[str]) -> list[nn.Parameter]:
    """Trainable model parameters that two or more trained tasks reach (GradNorm's / PCGrad's ``θ_s``)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if sharing == "hard":
        return [p for _, p in trainable]
    uses: dict[str, int] = {}
    for task in tasks:
        if task.name in trained:
            for name in chain(sharing, task, model):
                uses[name] = uses.get(name, 0) + 1
    shared = {name for name, count in uses.items() if count > 1}
    return [p for n, p in trainable if any(_owns(n, a) for a in shared)]


def parameters_per_task(model: nn.Module, sharing: str, tasks: Sequence[TaskSpec], heads: nn.Module) -> dict[str, int]:
    """Parameters a task owns alone (its adapter and head), the cost of adding it."""
    counts = {}
    for task in tasks:
        head = heads.heads[task.name] if task.name in heads.heads else None
        count = sum(p.numel() for p in head.parameters()) if head is not None else 0
        if sharing != "hard":
            count += sum(p.numel() for n, p in model.named_parameters() if _owns(n, task.name))
        counts[task.name] = count
    return counts
