"""FeatureTap: capture the outputs of named modules during a forward pass, without editing model code.

    with FeatureTap(model, ["model.layers.{i}", "self_attn"]) as tap:
        model(**batch)
        h = tap.features["model.layers.1"]          # (B, T, H), still in the autograd graph

Feature-based distillation (FitNets, TinyBERT, MiniLM) and analyses read intermediate outputs here.
Each entry selects modules by exact name, by a dotted suffix (``self_attn`` -> every
``...self_attn``), by a ``{i}`` template (``model.layers.{i}`` -> every layer), or by a regular
expression matched against the whole name. A module returning a tuple (or a ``ModelOutput``) is
captured by its first element. Features are *not* detached by default, because feature distillation
backpropagates through them; ``detach=True`` keeps only values. The features of the latest forward
pass of the root model are kept (they are cleared when the next one starts, or by :meth:`clear`) and
stay readable after the ``with`` block; every hook is removed on exit, even when the forward raises.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tunelab.errors import ConfigError


class FeatureTapError(ConfigError):
    """A module name or pattern that matches no module of the model."""


def _pattern(entry: str) -> re.Pattern | None:
    if "{i}" in entry:
        return re.compile(r"\d+".join(re.escape(part) for part in entry.split("{i}")))
    try:
        return re.compile(entry)
    except re.error:
        return None


def match_modules(model: nn.Module, entries: str | Sequence[str]) -> list[str]:
    """Names of the modules selected by ``entries``, in the model's module order.

    Raises:
        FeatureTapError: an entry matches no module (the message lists some module names).
    """
    entries = [entries] if isinstance(entries, str) else list(entries)
    names = [name for name, _ in model.named_modules() if name]  # the root itself is never tapped
    selected: set[str] = set()
    for entry in entries:
        pattern = _pattern(entry)
        found = {name for name in names if name == entry or name.endswith("." + entry)
                 or (pattern is not None and pattern.fullmatch(name))}
        if not found:
            close = difflib.get_close_matches(entry, names, n=3, cutoff=0.4) or names[:3]
            raise FeatureTapError(f"FeatureTap: {entry!r} matches no module of {type(model).__name__} "
                                  f"({len(names)} modules, e.g. {', '.join(close)})")
        selected |= found
    return [name for name in names if name in selected]


def _first_tensor(output: Any) -> Any:
    if isinstance(output, (tuple, list)):
        return output[0] if output else None
    if hasattr(output, "to_tuple"):  # a transformers ModelOutput
        values = output.to_tuple()
        return values[0] if values else None
    return output


class FeatureTap:
    """Forward hooks on named modules; ``features[name]`` is each module's latest output.

    Args:
        model: any ``nn.Module``.
        names: module names, dotted suffixes, ``{i}`` templates or regular expressions.
        detach: store ``output.detach()`` (no gradient) instead of the output itself.
    """

    def __init__(self, model: nn.Module, names: str | Sequence[str], *, detach: bool = False) -> None:
        self.model = model
        self.names = match_modules(model, names)  # resolved up front: a typo fails before any forward
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def open(self) -> FeatureTap:
        """Register the hooks (``with`` does this)."""
        if self._handles:
            raise RuntimeError("this FeatureTap is open already")
        modules = dict(self.model.named_modules())
        # Clearing at the start of each root forward drops the previous pass's graph, not just its values.
        self._handles.append(self.model.register_forward_pre_hook(lambda module, args: self.clear()))
        for name in self.names:
            self._handles.append(modules[name].register_forward_hook(self._capture(name)))
        return self

    def close(self) -> None:
        """Remove every hook; the features of the last pass stay readable."""
        while self._handles:
            self._handles.pop().remove()

    def clear(self) -> None:
        self.features.clear()

    def _capture(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            value = _first_tensor(output)
            self.features[name] = value.detach() if self.detach and isinstance(value, torch.Tensor) else value
        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.features[name]

    def __enter__(self) -> FeatureTap:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
