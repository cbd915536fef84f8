"""The generic tuner core: apply methods, switch named adapters, merge, unload, save and load.

Everything here is method-agnostic. A method (registry entry) only wraps its targets in
:class:`~tunelab.tuners.base.BaseTunerLayer` subclasses; the core then works through that small
interface on every wrapper it finds (``base.tuner_layers``):

- ``apply``: validate options, freeze the base (first adapter only), inject, wrap ``modules_to_save``
  (by default a task model's head, as HF PEFT), activate the new adapter. Only adapter parameters
  (and the head's copy) then have ``requires_grad``.
- ``set_active`` / ``disabled``: store names / a flag on every wrapper; outputs switch per call.
- ``merge`` / ``unmerge`` / ``unload``: ask each wrapper to fold, unfold, or step aside. Where
  different methods are stacked on one module (``base.py``, *Stacks*), merging goes from the inside
  out and unmerging from the outside in; an outer adapter merges only over merged inner ones.
- ``save`` / ``load``: an adapter's tensors are ``spec.adapter_state(model, name)``; saving writes
  them, loading injects a fresh adapter and copies the file's tensors into exactly those tensors.

Own format (every method, every adapter, one directory)::

    tunelab_adapter.json   {"format": "tunelab-adapter", "version": 1, "active": [...],
                            "adapters": {name: {"method": ..., "options": {...}}}, ...}
    adapter.safetensors    "<adapter name>/<module path>.<local key>" -> tensor

``format="peft"`` writes and ``load`` reads HF PEFT's files (see ``peft_format``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab import __version__
from tunelab.errors import MethodError
from tunelab.tuners import modules_to_save, peft_format, registry, targets
from tunelab.tuners.base import (
    BaseTunerLayer,
    MethodConfig,
    TunerState,
    check_adapter_name,
    clear_state,
    ensure_state,
    get_state,
    stack,
    tuner_layers,
)
from tunelab.utils import atomic_path, atomic_write_json

OWN_CONFIG = "tunelab_adapter.json"
OWN_WEIGHTS = "adapter.safetensors"
FORMATS = ("tunelab", "peft")


def methods() -> list[str]:
    """Registered method names, e.g. ``["full", "lora"]``."""
    return registry.methods()


def apply(model: nn.Module, method: str, *, adapter_name: str = "default", **options) -> nn.Module:
    """Add adapter ``adapter_name`` of ``method`` to ``model`` in place, activate it, return the model.

    Options use HF PEFT's names (``r``, ``lora_alpha``, ``target_modules``, ...). The first adapter
    freezes every base parameter; only adapter parameters train. The new adapter becomes the only
    active one (``set_active`` chooses several).

    A task head is never left frozen: on a ``*ForSequenceClassification`` / ``*ForTokenClassification``
    (/ ``*ForQuestionAnswering``) model the head (``classifier``, ``score``, ``qa_outputs``) goes to
    ``modules_to_save``, so it trains and is saved with the adapter, as HF PEFT does for those task
    types. An explicit ``modules_to_save`` (even ``None``) wins. Methods without that option get the
    head unfrozen instead; full fine-tuning trains it anyway.
    """
    spec = registry.get(method)
    heads = peft_format.task_heads(model) if spec.keeps_base_weights and "modules_to_save" not in options else []
    if heads and "modules_to_save" in spec.config_class.model_fields:
        options, heads = {**options, "modules_to_save": heads}, []
    config = registry.build_config(method, options)
    add_adapter(model, config, adapter_name)
    for head in heads:
        model.get_submodule(head).requires_grad_(True)
    set_active(model, [adapter_name])
    return model


def add_adapter(model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> None:
    """Inject an adapter from a validated config without changing which adapters are active."""
    spec = registry.get(config.method)
    config = config.model_copy(deep=True)  # inject may resolve defaults into it; never alias the caller's
    check_adapter_name(adapter_name)
    existing = adapters(model)
    if adapter_name in existing:
        raise MethodError(f"adapter {adapter_name!r} already exists; pass another adapter_name "
                          f"or call tuners.delete_adapter(model, {adapter_name!r}) first")
    exclusive = [s.name for s in [spec, *(registry.get(c.method) for c in existing.values())]
                 if not s.keeps_base_weights]
    if existing and exclusive:
        raise MethodError(f"{exclusive[0]!r} trains the base weights and cannot share a model with other "
                          "adapters; call tuners.unload(model) first or apply it to a fresh copy")
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    if not existing:
        model.requires_grad_(False)  # the first adapter freezes the base model
    try:
        spec.inject(model, config, adapter_name)
        names_to_save = getattr(config, "modules_to_save", None)
        if names_to_save:
            modules_to_save.wrap(model, names_to_save, adapter_name)
    except Exception:
        _remove_from_layers(model, adapter_name)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        raise
    ensure_state(model).configs[adapter_name] = config


def adapters(model: nn.Module) -> dict[str, MethodConfig]:
    """``{adapter name: config}`` of the adapters on ``model`` (empty for a bare model)."""
    state = get_state(model)
    return dict(state.configs) if state else {}


def active_adapters(model: nn.Module) -> list[str]:
    state = get_state(model)
    return list(state.active) if state else []


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``[(name, parameter)]`` of every parameter with ``requires_grad`` (the adapters' after apply)."""
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def _require_state(model: nn.Module) -> TunerState:
    state = get_state(model)
    if state is None or not state.configs:
        raise MethodError("the model has no adapters; call tuners.apply(model, method, ...) or tuners.load first")
    return state


def _check_known(state: TunerState, names: Sequence[str]) -> None:
    for name in names:
        if name not in state.configs:
            raise MethodError(f"unknown adapter {name!r}; the model has: {', '.join(state.configs)}")


def set_active(model: nn.Module, adapter_names: str | Sequence[str]) -> None:
    """Run exactly ``adapter_names`` from now on (several: their contributions add). Cheap: no copies."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    state = _require_state(model)
    _check_known(state, names)
    for name, config in state.configs.items():
        if name not in names and not registry.get(config.method).keeps_base_weights:
            raise MethodError(f"adapter {name!r} ({config.method}) trains the base weights and cannot be "
                              "deactivated; deep-copy the model before applying it to keep a reference")
    layers = [layer for _, layer in tuner_layers(model)]
    if any(set(layer.merged_adapters) - set(names) for layer in layers):
        raise MethodError("merged adapters cannot be deactivated; call tuners.unmerge(model) first")
    _check_stacks(model, names, {id(layer): set(layer.merged_adapters) for layer in layers})
    for layer in layers:
        layer.set_active(names)
    state.active = names


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model behaves as the base model (a DPO/KD reference without a copy)."""
    state = get_state(model)
    if state is None or not state.configs:
        yield model  # a bare model is its own base
        return
    for name, config in state.configs.items():
        if not registry.get(config.method).keeps_base_weights:
            raise MethodError(f"adapter {name!r} ({config.method}) keeps no copy of the base weights, so it "
                              "cannot be disabled; deep-copy the model before tuners.apply for a reference")
    layers = [layer for _, layer in tuner_layers(model)]
    if any(layer.merged_adapters for layer in layers):
        raise MethodError("adapters are merged into the base weights; call tuners.unmerge(model) before disabling")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous, strict=True):
            layer.disabled = flag


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> None:
    """Fold the active adapters (or ``adapter_names``, which must be active) into the base weights."""
    state = _require_state(model)
    _merge(model, state, list(state.active if adapter_names is None else adapter_names))


def _merge(model: nn.Module, state: TunerState, names: list[str]) -> None:
    _check_known(state, names)
    inactive = [name for name in names if name not in state.active]
    if inactive:
        raise MethodError(f"adapter {inactive[0]!r} is not active; call tuners.set_active before merging it")
    layers = [layer for _, layer in tuner_layers(model) if set(layer.adapter_names()) & set(names)]
    for layer in layers:
        if not layer.can_merge:
            raise MethodError(f"{type(layer).__name__} adapters cannot be merged into the base weights; "
                              "keep them unmerged or use tuners.unload(model, merge=False)")
    merged = {id(layer): set(layer.merged_adapters) | (set(names) & set(layer.adapter_names()))
              for _, layer in tuner_layers(model)}
    _check_stacks(model, state.active, merged)
    for layer in layers:  # innermost first: an outer layer folds into weights that hold the inner ones
        layer.merge(names)


def _check_stacks(model: nn.Module, active: Sequence[str], merged: dict[int, set[str]]) -> None:
    """In a stack of methods on one module, an outer layer's merged adapter rescales or adds to the base
    weight, so it is right only if every adapter running inside it is merged as well: MethodError if
    ``active`` adapters would run unmerged beneath a merged one (``merged``: id(layer) -> names)."""
    for path, outer in tuner_layers(model):
        if not merged.get(id(outer)):
            continue
        for inner in list(stack(outer))[1:]:
            running = [name for name in active if name in inner.adapter_names() and name not in merged[id(inner)]]
            if running:
                raise MethodError(f"{path}: adapter {running[0]!r} ({type(inner).__name__}) runs inside merged "
                                  f"{type(outer).__name__} adapters; merge the inner adapters first (all together: "
                                  "tuners.merge(model)) or unmerge")


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights again (stacks from the outside in)."""
    for _, layer in reversed(list(tuner_layers(model))):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every wrapper and return the bare model (in place).

    ``merge=False`` (PEFT's ``unload``) gives back the base model, unmerging first if needed;
    ``merge=True`` (PEFT's ``merge_and_unload``) keeps the active adapters' effect folded in.
    Base parameters stay frozen; full fine-tuning returns the model as trained.
    """
    state = get_state(model)
    if state is None:
        return model
    if merge:
        _merge(model, state, state.active)
    else:
        unmerge(model)  # from the outside in, before any layer of a stack steps aside
    for path, layer in list(tuner_layers(model)):  # innermost first: the outer layers still hold them
        _replace_layer(model, path, layer, layer.unload(merge))
    clear_state(model)
    return model


def _replace_layer(model: nn.Module, path: str, layer: BaseTunerLayer, new: nn.Module | None) -> None:
    """Put ``new`` where ``layer`` is: at ``path``, or as the ``base_layer`` of the layer stacked on it."""
    outer = model.get_submodule(path)
    if outer is layer:
        targets.replace_module(model, path, new)
        return
    while outer.base_layer is not layer:
        outer = outer.base_layer
    outer.base_layer = new


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Drop one adapter; wrappers left without adapters give their place back to the base module."""
    state = _require_state(model)
    _check_known(state, [adapter_name])
    if any(adapter_name in layer.merged_adapters for _, layer in tuner_layers(model)):
        raise MethodError(f"adapter {adapter_name!r} is merged; call tuners.unmerge(model) before deleting it")
    _remove_from_layers(model, adapter_name)
    del state.configs[adapter_name]
    remaining = [name for name in state.active if name != adapter_name]
    if not state.configs:
        clear_state(model)
    else:
        set_active(model, remaining)


def _remove_from_layers(model: nn.Module, adapter_name: str) -> None:
    for path, layer in list(tuner_layers(model)):
        if adapter_name in layer.adapter_names():
            layer.delete_adapter(adapter_name)
        if not layer.adapter_names():
            _replace_layer(model, path, layer, layer.unload(merge=False))


# ----------------------------------------------------------------------------------------- save / load


def save(model: nn.Module, path: str | os.PathLike, format: str = "tunelab",
         adapter_names: Sequence[str] | None = None) -> Path:
    """Write adapters (default: all) to directory ``path``; ``format="peft"`` writes HF PEFT files."""
    if format not in FORMATS:
        raise MethodError(f"unknown save format {format!r}; use one of: {', '.join(FORMATS)}")
    state = _require_state(model)
    names = list(state.configs if adapter_names is None else adapter_names)
    _check_known(state, names)
    path = Path(path)
    configs = {name: state.configs[name] for name in names}
    if format == "peft":
        peft_format.save(model, path, configs, {name: registry.get(c.method) for name, c in configs.items()})
        return path
    tensors = {}
    for name, config in configs.items():
        for key, tensor in registry.get(config.method).adapter_state(model, name).items():
            tensors[f"{name}/{key}"] = tensor.detach().cpu().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / OWN_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "tunelab"})
    record = {"format": "tunelab-adapter", "version": 1, "tunelab_version": __version__,
              "model_class": type(model).__name__, "base_model_name_or_path": peft_format.base_model_name(model),
              "active": [name for name in state.active if name in configs],
              "adapters": {name: {"method": config.method, "options": config.options()}
                           for name, config in configs.items()}}
    atomic_write_json(path / OWN_CONFIG, record)  # written last: its presence marks a complete save
    return path


def load(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load adapters saved by :func:`save` (either format) onto a bare or already-tuned model.

    Own format: every adapter in the file under its saved name; ``adapter_name`` picks one of them,
    or renames the file's only adapter. PEFT format: one adapter, named ``adapter_name`` or "default".
    The loaded adapters become the active ones.
    """
    path = Path(path)
    if (path / OWN_CONFIG).is_file():
        entries, active = _read_own(path, adapter_name)
        key_for: Callable[[str], str] = lambda key: key  # noqa: E731
    elif peft_format.is_peft_dir(path):
        name = adapter_name or "default"
        record, tensors = peft_format.read(path)
        method, options = registry.for_peft_type(record.get("peft_type")).from_peft(record, tensors)
        config = registry.build_config(method, options)
        entries, active, key_for = [(name, config, tensors)], [name], registry.get(method).peft_key
    else:
        raise MethodError(f"no adapter in {path}: expected {OWN_CONFIG} (tunelab) or "
                          f"{peft_format.PEFT_CONFIG} (HF PEFT); pass the directory that save() wrote")
    for _, _, tensors in entries:
        bad = next((key for key, tensor in tensors.items()
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
        if bad is not None:
            raise MethodError(f"adapter in {path}: tensor {bad} holds NaN or infinite values; "
                              "retrain it or load an earlier checkpoint")
    for name, config, tensors in entries:
        add_adapter(model, config, name)
        try:
            _copy_tensors(model, name, tensors, key_for, path)
        except Exception:
            delete_adapter(model, name)
            raise
    set_active(model, active)
    return model


def _read_own(path: Path, adapter_name: str | None) -> tuple[list[tuple[str, MethodConfig, dict]], list[str]]:
    try:
        record = json.loads((path / OWN_CONFIG).read_text(encoding="utf-8"))
        saved = record["adapters"]
        tensors = load_file(str(path / OWN_WEIGHTS))
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise MethodError(f"adapter in {path} is incomplete or corrupt ({type(error).__name__}: {error}); "
                          "save it again with tuners.save") from None
    if adapter_name is None:
        chosen = {name: name for name in saved}
    elif adapter_name in saved:
        chosen = {adapter_name: adapter_name}
    elif len(saved) == 1:
        chosen = {next(iter(saved)): adapter_name}
    else:
        raise MethodError(f"{path} holds adapters {', '.join(saved)}; pass one of them as adapter_name")
    entries = []
    for saved_name, new_name in chosen.items():
        entry = saved[saved_name]
        config = registry.build_config(entry["method"], entry.get("options", {}))
        prefix = f"{saved_name}/"
        entries.append((new_name, config, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}))
    active = [chosen[n] for n in record.get("active", []) if n in chosen] or list(chosen.values())
    return entries, active


@torch.no_grad()
def _copy_tensors(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor],
                  key_for: Callable[[str], str], source: Path) -> None:
    """Copy file tensors into the adapter's live tensors; every one must be present and fit."""
    expected = registry.get(adapters(model)[adapter_name].method).adapter_state(model, adapter_name)
    wanted = {key_for(key): key for key in expected}
    missing = [key for key in wanted if key not in tensors]
    unexpected = [key for key in tensors if key not in wanted]
    if missing or unexpected:
        example = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise MethodError(f"adapter {source} does not fit this model ({len(missing)} missing, {len(unexpected)} "
                          f"unexpected tensors, e.g. {example}); load it onto the model it was trained on")
    for file_key, own_key in wanted.items():
        target, value = expected[own_key], tensors[file_key]
        if target.shape != value.shape:
            raise MethodError(f"adapter {source}: tensor {file_key!r} has shape {tuple(value.shape)} but the model "
                              f"expects {tuple(target.shape)}; load it onto the model it was trained on")
        target.copy_(value)

