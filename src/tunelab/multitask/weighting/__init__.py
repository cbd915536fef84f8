"""Loss weightings for multi-task learning: one small module per weighting on one base class.

``WEIGHTINGS`` maps the names used in YAML (``objective.options.weighting.name``) to classes;
:func:`build_weighting` validates the options (unknown keys are errors).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from tunelab.errors import ConfigError
from tunelab.multitask.weighting.base import Weighting, surrogate, task_gradients
from tunelab.multitask.weighting.dwa import DWAWeighting, dwa_weights
from tunelab.multitask.weighting.equal import EqualWeighting
from tunelab.multitask.weighting.gradnorm import GradNormWeighting, gradnorm_loss
from tunelab.multitask.weighting.pcgrad import PCGradWeighting, pcgrad
from tunelab.multitask.weighting.static import StaticWeighting
from tunelab.multitask.weighting.uncertainty import UncertaintyWeighting

WEIGHTINGS: dict[str, type[Weighting]] = {
    "equal": EqualWeighting, "static": StaticWeighting, "uncertainty": UncertaintyWeighting,
    "dwa": DWAWeighting, "gradnorm": GradNormWeighting, "pcgrad": PCGradWeighting,
}


def weighting_options(name: str) -> list[str]:
    """The option names a weighting accepts (its constructor's keywords after ``tasks``)."""
    if name not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {name!r}; choose one of: {', '.join(WEIGHTINGS)}")
    return [p for p in inspect.signature(WEIGHTINGS[name].__init__).parameters if p not in ("self", "tasks", "options")]


def check_weighting(name: str, options: Mapping[str, Any]) -> None:
    valid = weighting_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"weighting {name!r}: unknown option {unknown[0]!r}; valid options: {', '.join(valid) or 'none'}")


def build_weighting(name: str, tasks: Sequence[str], options: Mapping[str, Any] | None = None) -> Weighting:
    check_weighting(name, options or {})
    return WEIGHTINGS[name](list(tasks), **dict(options or {}))


__all__ = [
    "DWAWeighting", "EqualWeighting", "GradNormWeighting", "PCGradWeighting", "StaticWeighting",
    "UncertaintyWeighting", "WEIGHTINGS", "Weighting", "build_weighting", "check_weighting", "dwa_weights",
    "gradnorm_loss", "pcgrad", "surrogate", "task_gradients", "weighting_options",
]
