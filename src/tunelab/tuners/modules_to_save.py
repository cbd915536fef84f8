"""``modules_to_save``: whole modules (typically a new classification head) trained per adapter.

A low-rank delta on a randomly initialised head makes little sense; the head must train in full. As
in HF PEFT, the module is wrapped by :class:`ModulesToSaveLayer`, which keeps the original as
``base_layer`` and a trainable deep copy per adapter in ``modules_to_save[name]``. The first active
adapter that has a copy runs; disabled, or with no such adapter active, the original runs. The copy
is saved with the adapter (PEFT stores it under the module's own path, e.g. ``classifier.weight``).
Any method whose config has a ``modules_to_save`` field gets this from the core.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners import targets
from tunelab.tuners.base import BaseTunerLayer


class ModulesToSaveLayer(BaseTunerLayer):
    """The original module plus one trainable copy per adapter."""

    adapter_attribute_names = ("modules_to_save",)
    can_merge = True  # merging is a no-op: the copy keeps running

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str) -> None:
        module = copy.deepcopy(self.base_layer)
        module.requires_grad_(True)
        self.modules_to_save[name] = module

    def _running(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                return self.modules_to_save[name]
        return self.base_layer

    def forward(self, *args, **kwargs):
        return self._running()(*args, **kwargs)

    def merge(self, names: Sequence[str]) -> None:
        """Nothing to fold: the active copy keeps running until unload."""

    def unload(self, merge: bool) -> nn.Module:
        return self._running() if merge else self.base_layer


def wrap(model: nn.Module, names: Sequence[str], adapter_name: str) -> list[str]:
    """Give ``adapter_name`` a trainable copy of every module matching ``names`` (PEFT's suffix rule)."""
    paths = [path for path, _ in targets.candidate_modules(model) if targets.matches(path, list(names))]
    if not paths:
        raise MethodError(f"modules_to_save {sorted(names)!r} matched no module; name a module of the model, "
                          "e.g. 'classifier'")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, BaseTunerLayer) and not isinstance(module, ModulesToSaveLayer):
            raise MethodError(f"module {path!r} is both an adapter target and in modules_to_save; "
                              "remove it from one of them")
        if any(isinstance(inner, BaseTunerLayer) for inner in module.modules()) and not isinstance(module, ModulesToSaveLayer):
            raise MethodError(f"module {path!r} in modules_to_save contains adapter layers; "
                              "exclude its submodules from target_modules")
        layer = module if isinstance(module, ModulesToSaveLayer) else ModulesToSaveLayer(module)
        if layer is not module:
            targets.replace_module(model, path, layer)
        layer.add_adapter(adapter_name)
    return paths
