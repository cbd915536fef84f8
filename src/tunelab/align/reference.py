"""The reference policy π_ref of DPO, KTO, PPO and GRPO: explicit, cheap, and checked.

Every KL-regularised alignment loss compares the policy π_θ with a frozen reference π_ref. Users of
TRL + PEFT meet three failures here: a second full model copy in memory, rewards stuck at zero after
a LoRA SFT (the reference silently *is* the SFT'd policy, or silently is *not*), and a wrong
reference that nobody notices. tunelab makes the choice explicit:

    reference: base         π_ref = the model with every adapter disabled (``tuners.disabled``):
                            no copy at all. Right for a fresh adapter on the model you start from.
    reference: sft_adapter  π_ref = the model with a frozen copy of the *trainable* tensors taken in
                            ``setup`` swapped in (a LoRA's few MB, not a model). Right after an SFT
                            stage that trained the same adapter, or when a new adapter is stacked on
                            a frozen SFT one — what TRL does when the model already has an adapter.
    reference: precomputed  log π_ref computed once per record before the first step (the model as
                            it is at setup), then read from a cache: no reference forward per step.
    reference: none         no reference (ORPO, SimPO).

and checks it: at step 0 the policy *is* the reference, so every log-ratio log π_θ − log π_ref (the
implicit reward margin, the KL) must be 0. :meth:`Reference.check` stops training with a one-line
error when it is not (``|log π − log π_ref|`` above ``tolerance`` nats per sequence), which is exactly
what happens with ``reference: base`` after an SFT stage trained the same adapter.

The reference forward runs without gradient and in eval mode (no dropout), as TRL runs its reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from tunelab import tuners
from tunelab.errors import ConfigError

ReferenceMode = Literal["base", "sft_adapter", "precomputed", "none"]
REFERENCE_MODES = ("base", "sft_adapter", "precomputed", "none")


def disable_dropout(model: nn.Module) -> dict[nn.Module, float]:
    """Set every dropout probability to 0 (TRL's ``disable_dropout=True`` default for preference losses):
    with dropout the policy never equals the reference, and the step-0 check would be noise.

    Returns ``{module: its former p}`` for the modules it changed (see :class:`StageDropout`)."""
    changed = {}
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p != 0.0:
            changed[module] = module.p
            module.p = 0.0
    return changed


class StageDropout:
    """``disable_dropout`` for one stage only: ``off(model)`` in ``setup``, ``restore()`` in ``on_stage_end``.

    The model carries over to later stages (an SFT stage after DPO, the evaluation): they get the
    dropout probabilities back that the model had before this stage switched them off.
    """

    def __init__(self) -> None:
        self.saved: dict[nn.Module, float] = {}

    def off(self, model: nn.Module) -> None:
        for module, p in disable_dropout(model).items():
            self.saved.setdefault(module, p)  # a second setup finds p = 0 already: keep the first value

    def restore(self) -> None:
        for module, p in self.saved.items():
            module.p = p
        self.saved.clear()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def swapped(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block the named parameters hold ``tensors``; the live values come back afterwards."""
    params = dict(model.named_parameters())
    live = {name: params[name].detach().clone() for name in tensors}
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, value in live.items():
                params[name].copy_(value)


class Reference:
    """π_ref for one objective: ``setup(model)`` once, then ``logps(model, batch, compute)`` per step.

    ``compute(model, batch) -> tensor`` is the objective's log-prob function (per sequence, or per token
    for PPO / GRPO); the reference runs the same function under the chosen mode. ``precomputed`` needs
    ``batch["record_keys"]`` and a compute that returns one row per key.
    """

    def __init__(self, mode: ReferenceMode, tolerance: float = 1e-3, check: bool = True) -> None:
        if mode not in REFERENCE_MODES:
            raise ConfigError(f"reference must be one of {', '.join(REFERENCE_MODES)}; got {mode!r}")
        self.mode, self.tolerance, self.check_enabled = mode, tolerance, check and mode != "none"
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.target: nn.Module | None = None  # the unwrapped model (the loop may hand loss() a DDP wrapper)
        self.cache: dict[str, torch.Tensor] = {}
        self.checked = False

    @property
    def ready(self) -> bool:
        """Whether π_ref can run now: ``base`` always, ``sft_adapter`` / ``precomputed`` once ``setup`` took
        their copy (an objective evaluated before training, e.g. the untuned baseline, has none yet)."""
        return self.mode == "base" or (self.mode != "none" and self.snapshot is not None)

    def setup(self, model: nn.Module) -> None:
        """Take the frozen copy of the trainable tensors (``sft_adapter``; ``precomputed`` too, for records
        met only after training started, e.g. eval records)."""
        self.target = model
        if self.mode == "base" and not tuners.adapters(model):
            raise ConfigError("reference: base needs a model with an adapter (tuners.disabled gives the base model); "
                              "with full fine-tuning use reference: sft_adapter or precomputed")
        if self.mode in ("sft_adapter", "precomputed"):
            self.snapshot = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model behaving as π_ref (no gradient, eval mode)."""
        target = self.target if self.target is not None else model
        with torch.no_grad(), eval_mode(model):
            if self.mode == "base":
                with tuners.disabled(target):
                    yield model
            else:
                if self.snapshot is None:
                    raise ConfigError(f"reference {self.mode!r} was not set up; call objective.setup(model, accelerator)")
                with swapped(target, self.snapshot):
                    yield model

    def logps(self, model: nn.Module, batch: dict[str, Any], compute: Callable[[nn.Module, dict], torch.Tensor]
              ) -> torch.Tensor:
        """log π_ref of the batch, shaped as ``compute`` returns it (rows in ``record_keys`` order)."""
        if self.mode == "none":
            raise ConfigError("this loss has no reference (reference: none)")
        if self.mode != "precomputed":
            with self.active(model):
                return compute(model, batch).detach()
        keys = batch["record_keys"]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            with self.active(model):
                values = compute(model, batch).detach()
            for i in missing:
                self.cache[keys[i]] = values[i].cpu()
        device = next(model.parameters()).device
        return torch.stack([self.cache[key] for key in keys]).to(device)

    def precompute(self, model: nn.Module, records: Sequence[dict], collate: Callable, compute: Callable,
                   batch_size: int = 8) -> None:
        """Fill the cache for ``records`` (``precomputed``: before the first step). Keys already cached stay."""
        device = next(model.parameters()).device
        for start in range(0, len(records), batch_size):
            batch = collate(list(records[start : start + batch_size]))
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            self.logps(model, batch, compute)

    def check(self, name: str, difference: torch.Tensor) -> None:
        """At the first training step: every log π − log π_ref (``difference``) must be ~0, else stop."""
        if self.checked or not self.check_enabled:
            return
        self.checked = True
        worst = float(difference.detach().abs().max()) if difference.numel() else 0.0
        if worst > self.tolerance:
            hint = ("an earlier stage trained this adapter, so the base model is not where the policy starts: "
                    "use reference: sft_adapter or precomputed" if self.mode == "base"
                    else "the reference is not the model at the start of this stage")
            raise ConfigError(f"{name}: at step 0 the policy differs from the reference (max |log π − log π_ref| = "
                              f"{worst:.4g} nats > tolerance {self.tolerance:g}, reference: {self.mode}); {hint} "
                              "(or set check_reference: false)")

    def state_dict(self) -> dict[str, Any]:
        return {"checked": self.checked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checked = bool(state.get("checked", self.checked))
