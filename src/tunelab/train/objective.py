"""The objective seam: what differs between SFT, classification, distillation, DPO, ... is an objective.

The training loop (:func:`tunelab.train.train`) is generic. An *objective* tells it how to turn records
into batches (``collator``) and in which order (``sampler``, default epochs), how to compute the loss
of a batch (``loss``), which extra trainable
modules it owns (``modules``: a KD projector, a value head, per-task heads, a learned loss weight —
they join the optimizer *and* the checkpoint), what state it carries across a resume (``state_dict``),
how to score a model on held-out records (``evaluate``), what to do when a stage ends
(``on_stage_end``: EWC's Fisher, LwF's snapshot) and what to save beside the adapters
(``save_outputs`` / ``load_outputs``: the multi-task heads).

A new objective is one file plus one registry line (``tunelab.experiments.registry``)::

    class MyOptions(ObjectiveConfig):
        weight: float = 1.0

    class MyObjective(BaseObjective):
        config_class = MyOptions
        model_task = "causal_lm"

        def loss(self, model, batch) -> LossOutput:
            out = model(**batch)
            return LossOutput(self.config.weight * out.loss, {"nll": out.loss.item()})

The loop calls, per step: ``batch = collate(records)``; ``out = objective.loss(model, batch)``;
``backward(out.loss)``; every float in ``out.metrics`` is averaged over the log window and written to
``metrics.jsonl`` beside the loss and shown on the progress bar.

Under data parallelism (``accelerate launch``, ``tunelab run --processes N``; ``tests/test_ddp_objectives.py``
runs every registered objective so) each rank trains on its share of the global batch and DDP averages the
gradients, so ``loss`` should be the per-rank term whose mean over ranks is the one-process loss:

- ``loss`` gets the DDP wrapper in training steps (every rank runs them together) and the bare model in
  rank 0's evaluation. Tuner state and the cross-stage store are found through the wrapper; code with a
  rank-local number of forwards (sampling, generation) runs ``tunelab.utils.unwrap_model(model)``.
- A batch statistic that must be global (KTO's reference point, PPO's KL for its adaptive coefficient)
  goes through ``tunelab.utils.ranks_mean(value, model)`` (a no-op on one process and in evaluation).
- ``setup`` gets the accelerator: ``process_index`` and ``num_processes`` for objectives that split draws
  of their own (replay's buffer examples); teachers and references are placed on ``accelerator.device``
  there, once.
- ``find_unused_parameters = True`` when trainable *model* parameters may get no gradient in a step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from tunelab.errors import DataError


@dataclass
class LossOutput:
    """What :meth:`Objective.loss` returns.

    Attributes:
        loss: the scalar to backpropagate.
        metrics: floats to log with it (``{"kd": 0.41, "ce": 1.2}``); averaged over the log window.
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """The protocol every objective follows (see the module docstring)."""

    model_task: str
    find_unused_parameters: bool

    def collator(self, tokenizer: Any, labels: Sequence[str] | None, **data_options: Any) -> Callable: ...

    def setup(self, model: nn.Module, accelerator: Any) -> None: ...

    def modules(self) -> list[nn.Module]: ...

    def sampler(self, records: Sequence[Any], config: Any, rank: int, world_size: int) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> LossOutput: ...

    def evaluate(self, model: nn.Module, records: Sequence[Any], **kwargs: Any) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None: ...

    def save_outputs(self, model: nn.Module, directory: Path) -> dict[str, Path]: ...

    def load_outputs(self, model: nn.Module, directory: Path) -> None: ...


class ObjectiveConfig(BaseModel):
    """Base of every objective's options: unknown keys are errors (a typo fails at YAML load)."""

    model_config = ConfigDict(extra="forbid")


class BaseObjective:
    """Defaults for every hook, so an objective writes only what differs.

    ``config_class`` validates the options; ``label_key`` names the record field that holds labels for
    understanding tasks (``label``, ``ner_tags``) and is ``None`` for generation.
    """

    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    model_task: ClassVar[str] = "causal_lm"
    label_key: ClassVar[str | None] = None
    #: True when some trainable *model* parameters may get no gradient in a step (per-task adapters
    #: switched per batch, a model head the objective never calls): under DDP the engine then asks DDP to
    #: find them (``find_unused_parameters``). The objective's own ``modules()`` need no flag: the loop
    #: averages their gradients itself, ``None`` where no rank has one.
    find_unused_parameters: ClassVar[bool] = False

    def __init__(self, config: ObjectiveConfig | None = None, **options: Any) -> None:
        self.config = config if config is not None else self.config_class(**options)
        self.tokenizer: Any = None
        self.labels: list[str] | None = None
        self.collate_fn: Callable[[list[Any]], Any] | None = None

    # --- data
    def collator(self, tokenizer: Any, labels: Sequence[str] | None, **data_options: Any) -> Callable:
        """``list[record] -> batch``; remembers the tokenizer and labels for :meth:`evaluate`."""
        self.tokenizer, self.labels = tokenizer, list(labels) if labels is not None else None
        self.collate_fn = self.make_collator(tokenizer, self.labels, **data_options)
        return self.collate_fn

    def make_collator(self, tokenizer: Any, labels: list[str] | None, **data_options: Any) -> Callable:
        raise NotImplementedError(f"{type(self).__name__} must implement make_collator")

    # --- training
    def setup(self, model: nn.Module, accelerator: Any) -> None:
        """Place extra modules on the accelerator's device (teachers, references, heads)."""
        for module in self.modules():
            module.to(accelerator.device)

    def modules(self) -> list[nn.Module]:
        return []

    def sampler(self, records: Sequence[Any], config: Any, rank: int = 0, world_size: int = 1) -> Any:
        """The objective's own batch order (e.g. per-task sampling), or None for the default epochs.

        Called by :func:`~tunelab.train.train` when no sampler is passed; ``config`` is the
        :class:`~tunelab.train.TrainConfig` (batch size, seed, max_steps).
        """
        return None

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """Default: ``model(**batch).loss`` (the Hugging Face convention when the batch has labels)."""
        loss = getattr(model(**batch), "loss", None)
        if loss is None:
            raise DataError("model(**batch) returned no loss; use a collator that adds 'labels'")
        return LossOutput(loss)

    # --- evaluation and state
    def evaluate(self, model: nn.Module, records: Sequence[Any], **kwargs: Any) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        return None

    def save_outputs(self, model: nn.Module, directory: Path) -> dict[str, Path]:
        """Write into ``directory`` what serving ``model`` needs besides its adapters and that lives outside
        its parameters (the multi-task heads); returns ``{name: path written}``.

        The runner calls it with the adapter directory (``runs/<n>/adapters/<run>/``) at the end of a cell,
        and with a scratch folder after every stage, from which :meth:`load_outputs` restores a finished
        stage when a killed cell resumes.
        """
        return {}

    def load_outputs(self, model: nn.Module, directory: Path) -> None:
        """Put back onto ``model`` what :meth:`save_outputs` wrote to ``directory`` (absent: nothing to do)."""
        return None


class FunctionObjective(BaseObjective):
    """An objective from a plain ``collate_fn`` and ``loss_fn`` — the loop's original call style.

    ``train(model, records, collate_fn, config, loss_fn=...)`` wraps its arguments in this class, so
    code written before the seam keeps working unchanged. ``loss_fn`` may return a tensor or a
    :class:`LossOutput`.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], loss_fn: Callable | None = None) -> None:
        super().__init__()
        self.collate_fn = collate_fn
        self.loss_fn = loss_fn

    def collator(self, tokenizer: Any = None, labels: Sequence[str] | None = None, **data_options: Any) -> Callable:
        return self.collate_fn

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        if self.loss_fn is None:
            return super().loss(model, batch)
        return as_loss_output(self.loss_fn(model, batch))


def as_loss_output(value: torch.Tensor | LossOutput) -> LossOutput:
    """Accept a bare tensor where a :class:`LossOutput` is expected."""
    return value if isinstance(value, LossOutput) else LossOutput(value)


def is_objective(value: Any) -> bool:
    """True for objects with the objective hooks the loop calls (not for a plain collate function)."""
    return all(hasattr(value, name) for name in ("loss", "collator", "modules", "state_dict"))
