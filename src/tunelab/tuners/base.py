"""The contract between the tuner core and the methods: configs, wrapper layers, per-model state.

The idea (HF PEFT's injection pattern): a method replaces each target module by a *wrapper layer* that
keeps the original module as ``base_layer`` and holds every named adapter's parameters in containers
keyed by adapter name (``lora_A["default"]``, ``lora_B["default"]``, ...). Because the base stays
untouched, the generic core can run several adapters side by side, switch them per batch, disable them
all, fold them into the base weights (merge), take them out again (unmerge) and drop them (unload).

What a method provides (see ``registry.MethodSpec``):

- a config class, a subclass of :class:`MethodConfig` (pydantic, unknown options rejected);
- an ``inject(model, config, adapter_name)`` function that wraps its targets with
  :class:`BaseTunerLayer` subclasses (or adds an adapter to wrappers already there).

What a wrapper layer provides (:class:`BaseTunerLayer`); the core asks only for this:

=========================  ===================================================================
``base_layer``             the original module (``None`` for layers that add a module)
``active_adapters``        names that run in ``forward``; set by ``set_active`` (a tuple store)
``disabled``               ``True`` -> ``forward`` is the base layer's forward
``merged_adapters``        names folded into the base weights
``can_merge``              whether ``merge`` can fold this layer's adapters (class attribute)
``stackable``              whether this layer may wrap, or be wrapped by, another method's layer
                           (class attribute; see *Stacks* below)
``merge(names)``           fold adapters into the base weights (default: not mergeable)
``unmerge()``              undo every merge
``adapter_state(name)``    ``{local key: live tensor}`` for one adapter (save/load copy into these)
``delete_adapter(name)``   drop one adapter's parameters
``unload(merge)``          the module that replaces this wrapper when adapters are removed
=========================  ===================================================================

Per-adapter parameters live in ``nn.ModuleDict`` / ``nn.ParameterDict`` attributes whose names are
listed in ``adapter_attribute_names``; ``adapter_state``, ``delete_adapter`` and ``adapter_names`` are
generic over them, so a new method only writes ``add_adapter``, ``forward`` and, if it can, ``merge``.

Stacks (different methods on one module, e.g. LoRA and (IA)³ on ``k_proj``): a method whose target is
already wrapped by *another* method's layer wraps that layer in turn, when both classes are
``stackable``; the later method then runs on the output of the one inside::

    IA3Layer ── base_layer: LoraLayer ── base_layer: Linear      h = l ⊙ (W x + s B A x)

:func:`tuner_layers` yields every layer of a stack (innermost first) under the path of the module the
stack stands at, so adapter tensors keep the same keys however many methods wrap around them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from tunelab.errors import MethodError
from tunelab.utils import unwrap_model

STATE_ATTRIBUTE = "_tunelab_tuners"  # where the per-model TunerState lives (a plain attribute)
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-]+")  # ModuleDict keys cannot hold "."; "/" splits files


class MethodConfig(BaseModel):
    """Base class of every method's options; subclasses declare fields with HF PEFT's names."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: ClassVar[str] = ""

    def options(self) -> dict[str, Any]:
        """The options as plain JSON values (what the own save format stores)."""
        return self.model_dump(mode="json")


@dataclass
class TunerState:
    """What the core remembers about a tuned model: each adapter's config and the active names."""

    configs: dict[str, MethodConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def get_state(model: nn.Module) -> TunerState | None:
    """The model's :class:`TunerState`, or ``None`` for a bare model.

    A DDP wrapper (what an objective's ``loss`` gets under ``accelerate launch``) is looked through: without
    that, ``tuners.disabled(wrapper)`` would find no adapters and silently leave them on.
    """
    return getattr(unwrap_model(model), STATE_ATTRIBUTE, None)


def ensure_state(model: nn.Module) -> TunerState:
    model = unwrap_model(model)
    state = get_state(model)
    if state is None:
        state = TunerState()
        object.__setattr__(model, STATE_ATTRIBUTE, state)  # not a Module/Parameter: a plain attribute
    return state


def clear_state(model: nn.Module) -> None:
    model = unwrap_model(model)
    if get_state(model) is not None:
        object.__delattr__(model, STATE_ATTRIBUTE)


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise MethodError(f"invalid adapter_name {name!r}; use letters, digits, '_' or '-' (e.g. 'default')")


class BaseTunerLayer(nn.Module):
    """A wrapper around ``base_layer`` holding named adapters; subclasses add ``forward``/``merge``."""

    adapter_attribute_names: ClassVar[tuple[str, ...]] = ()
    can_merge: ClassVar[bool] = False  # True for layers whose adapters are a foldable weight change
    stackable: ClassVar[bool] = False  # True for layers that compute from their base layer's output alone

    def __init__(self, base_layer: nn.Module | None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Instance copy, so a variant (e.g. DoRA) can add containers to one layer with add_container.
        self.adapter_attribute_names = tuple(type(self).adapter_attribute_names)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for model code that reads ``module.weight`` (dtype, device, shape)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_container(self, attribute: str, container: nn.ModuleDict | nn.ParameterDict) -> None:
        """Register one more per-adapter container (for variants that need extra parameters)."""
        if attribute not in self.adapter_attribute_names:
            setattr(self, attribute, container)
            self.adapter_attribute_names = (*self.adapter_attribute_names, attribute)

    def _containers(self) -> Iterator[tuple[str, nn.ModuleDict | nn.ParameterDict]]:
        for attribute in self.adapter_attribute_names:
            yield attribute, getattr(self, attribute)

    def adapter_names(self) -> list[str]:
        """Adapters this layer holds, in the order they were added."""
        names: dict[str, None] = {}
        for _, container in self._containers():
            names.update(dict.fromkeys(container.keys()))
        return list(names)

    def set_active(self, names: Sequence[str]) -> None:
        """Run ``names`` (those this layer holds) in ``forward``; cheap: stores a tuple."""
        held = self.adapter_names()
        self.active_adapters = tuple(name for name in names if name in held)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """``{"<container>.<key>": tensor}`` for adapter ``name``; tensors are live (copy into them)."""
        state: dict[str, torch.Tensor] = {}
        for attribute, container in self._containers():
            if name not in container:
                continue
            value = container[name]
            if isinstance(value, nn.Parameter):
                state[attribute] = value.data
            else:
                for key, tensor in value.state_dict().items():
                    state[f"{attribute}.{key}"] = tensor
        return state

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MethodError(f"adapter {name!r} is merged; call tuners.unmerge(model) before deleting it")
        for _, container in self._containers():
            if name in container:
                del container[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def merge(self, names: Sequence[str]) -> None:
        """Fold ``names`` into the base weights. Methods whose adapters are not a weight delta keep this."""
        raise MethodError(f"{type(self).__name__} adapters cannot be merged into the base weights; "
                          "use tuners.unload(model, merge=False) or keep the adapter")

    def unmerge(self) -> None:
        """Undo every merge (nothing to undo for layers that never merge)."""

    def unload(self, merge: bool) -> nn.Module | None:
        """The module that takes this wrapper's place when adapters are removed (None: delete it)."""
        if merge:
            self.merge([n for n in self.active_adapters if n not in self.merged_adapters])
        else:
            self.unmerge()
        return self.base_layer


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, BaseTunerLayer]]:
    """Every wrapper layer with the path of the module it stands at.

    Layers stacked on one module (see *Stacks* above) all come under that path, innermost first (the
    order they compute in, and the order merging must follow). Modules inside a wrapper other than its
    ``base_layer`` chain (``modules_to_save`` copies) are skipped.
    """
    yield from _walk(model, "")


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, BaseTunerLayer]]:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, BaseTunerLayer):
            yield from ((path, layer) for layer in reversed(list(stack(child))))
        else:
            yield from _walk(child, path)


def stack(layer: BaseTunerLayer) -> Iterator[BaseTunerLayer]:
    """``layer`` and the wrapper layers it wraps through ``base_layer``, outermost first."""
    while isinstance(layer, BaseTunerLayer):
        yield layer
        layer = layer.base_layer


def layer_adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Default ``adapter_state`` of a method: every wrapper's tensors for ``name``, keyed by full path."""
    state: dict[str, torch.Tensor] = {}
    for path, layer in tuner_layers(model):
        for key, tensor in layer.adapter_state(name).items():
            state[f"{path}.{key}"] = tensor
    return state
