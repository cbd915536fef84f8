"""State that crosses stages: a plain dict attached to the model object.

The runner builds a fresh objective for every stage, but continual-learning strategies need what the
earlier stages left behind: replay's buffer, EWC's Fisher and anchor, LwF's snapshot, O-LoRA's list of
finished adapters, the per-domain adapters' names. The one object that lives through every stage of a
cell is the model, so that state is a non-parameter attribute of it::

    store(model)["ewc"] = {"fisher": {...}, "anchor": {...}}

Why the model and not a module-level registry: the state's lifetime is exactly the model's (a new
cell builds a new model and starts clean, a deep copy of a model copies its history, nothing leaks
between cells that share a process, no weak references). It is never a parameter or buffer, so it is
not saved with the adapters, not moved by ``.to()`` and never trained. Tensors in it are clones.

A checkpoint still holds each objective's own copy (``state_dict``), so a resumed stage is exact.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tunelab.utils import unwrap_model as unwrap  # noqa: F401  (kept importable from here)

ATTRIBUTE = "_tunelab_adapt_state"


def store(model: nn.Module) -> dict[str, Any]:
    """The cross-stage state dict of ``model`` (created empty on first use)."""
    model = unwrap(model)
    state = model.__dict__.get(ATTRIBUTE)
    if state is None:
        state = {}
        model.__dict__[ATTRIBUTE] = state
    return state


def trainable_adapter(model: nn.Module) -> str | None:
    """The name of the adapter whose parameters train now (a stage method's new adapter), if exactly one."""
    from tunelab import tuners

    names = list(tuners.adapters(model))
    training = [name for name in names if any(
        parameter.requires_grad and _belongs(param_name, name)
        for param_name, parameter in model.named_parameters())]
    return training[-1] if training else None


def _belongs(param_name: str, adapter: str) -> bool:
    parts = param_name.split(".")
    return adapter in parts
