"""AdapterDrop: skip the adapters of the lowest blocks, in training (robustness) and at inference (speed).

Rücklé et al., "AdapterDrop: On the Efficiency of Adapters in Transformers", EMNLP 2021,
arXiv:2010.11918. Two uses:

- **Training** (``adapterdrop_train_layers=N`` on ``bottleneck`` / ``compacter``): every forward pass
  draws ``n ~ U{0..N}`` and runs no adapter in blocks ``0..n-1`` ("robust AdapterDrop"), so the
  adapter learns to work whatever number of lower blocks is later dropped.
- **Inference** (:func:`set_adapter_drop`): no adapter runs in the first ``k`` blocks. For one task
  that saves only the adapters' own cost; the real gain is with **several task adapters on one
  batch** (:func:`parallel_adapters`): without adapters, the first ``k`` blocks compute the same
  thing for every task, so they run *once* on the batch, which is then copied once per task::

      k = 0:   embed ─┬─ block 0..L-1 with adapter 1 ─ head 1       cost ≈ n · L blocks
                      ├─ ...
                      └─ block 0..L-1 with adapter n ─ head n
      k > 0:   embed ── block 0..k-1 (shared) ─┬─ block k..L-1 with adapter 1 ─ head 1
                                               └─ ...                           cost ≈ k + n (L - k)

How the code maps to it: every ``bottleneck.AdapterLayer`` knows its block index; ``drop_first``
makes it skip its adapters below ``k``, and a shared ``DropSampler`` draws ``n`` in training. For
parallel inference, forward pre-hooks on the blocks copy the batch ``n`` times at block ``k``
(``hidden.repeat(n, ...)``, and every other batch-major tensor argument: attention masks, position
ids, rotary tables), and each ``AdapterLayer`` applies adapter ``j`` to rows ``j·B..(j+1)·B-1``. The
model's output then has ``n·B`` rows, task-major; split it with ``output.chunk(n)``. Heads shared by
the model run on every slice; per-task heads are applied by the caller to its slice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners.adapters.bottleneck import AdapterLayer, find_blocks
from tunelab.tuners.base import get_state, tuner_layers


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    """Every :class:`AdapterLayer`; MethodError when the model has none."""
    layers = [layer for _, layer in tuner_layers(model) if isinstance(layer, AdapterLayer)]
    if not layers:
        raise MethodError("the model has no bottleneck/compacter adapters; AdapterDrop applies to those, "
                          "add one with tuners.apply(model, 'bottleneck', ...)")
    return layers


def set_adapter_drop(model: nn.Module, k: int) -> None:
    """Run no adapter in blocks ``0..k-1`` from now on (``k=0``: every adapter runs again)."""
    layers = adapter_layers(model)
    num_blocks = max(len(stack) for stack in find_blocks(model))
    if not isinstance(k, int) or not 0 <= k <= num_blocks:
        raise MethodError(f"AdapterDrop k={k!r} is out of range; pass an integer in 0..{num_blocks} "
                          "(the number of lowest blocks without adapters)")
    for layer in layers:
        layer.drop_first = k


def adapter_drop(model: nn.Module) -> int:
    """The current inference-time ``k`` (0 when no adapters are dropped)."""
    return max(layer.drop_first for layer in adapter_layers(model))


@contextmanager
def parallel_adapters(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, one forward pass runs every adapter of ``adapter_names`` on its own copy of the batch.

    The output has ``len(adapter_names) · B`` rows: rows ``j·B..(j+1)·B-1`` are adapter ``j``'s. With
    :func:`set_adapter_drop` ``k > 0`` the first ``k`` blocks run once, on ``B`` rows. Inference only
    (the copies share one input; no labels); models with one stack of blocks (decoder or encoder).
    """
    names = tuple(adapter_names)
    layers = adapter_layers(model)
    state = get_state(model)
    unknown = [name for name in names if state is None or name not in state.configs]
    if unknown or not names:
        raise MethodError(f"parallel_adapters needs adapter names the model has; got {list(names)} "
                          f"(the model has: {', '.join(state.configs) if state else 'none'})")
    missing = [name for name in names if not any(name in layer.adapters for layer in layers)]
    if missing:
        raise MethodError(f"adapter {missing[0]!r} is not a bottleneck/compacter adapter; parallel_adapters "
                          "runs those only")
    stacks = find_blocks(model)
    if len(stacks) != 1:
        raise MethodError(f"parallel_adapters supports models with one stack of blocks; this one has {len(stacks)}")
    handles = _replication_hooks(stacks[0], layers, len(names))
    previous = [layer.parallel_names for layer in layers]
    for layer in layers:
        layer.parallel_names = names
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for layer, value in zip(layers, previous, strict=True):
            layer.parallel_names = value


def _replication_hooks(stack: list[tuple[str, nn.Module]], layers: list[AdapterLayer], copies: int) -> list:
    """Hooks that copy the batch ``copies`` times at the first block whose adapters run."""
    drop_first = max(layer.drop_first for layer in layers)
    running = [layer.layer_index for layer in layers if layer.layer_index >= drop_first]
    start = min(running) if running else len(stack)
    batch = {"size": None}  # B, recorded by the first hooked block of each forward pass

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict, first: bool) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        if first:
            batch["size"] = hidden.shape[0]
        size = batch["size"]
        return _expand(args, size, copies), _expand(kwargs, size, copies)

    def post_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        return _expand(output, hidden.shape[0], copies)

    if start == len(stack):  # every adapter dropped: run all blocks once, copy the final hidden states
        return [stack[-1][1].register_forward_hook(post_hook)]
    return [block.register_forward_pre_hook(
        lambda module, args, kwargs, first=(index == start): pre_hook(module, args, kwargs, first), with_kwargs=True)
        for index, (_, block) in enumerate(stack) if index >= start]


def _expand(value: Any, size: int, copies: int) -> Any:
    """Repeat every batch-major tensor (``ndim >= 2``, ``shape[0] == size``) ``copies`` times along dim 0."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == size:
            return value.repeat(copies, *([1] * (value.dim() - 1)))  # (copies * B, ...), task-major
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_expand(item, size, copies) for item in value)
    if isinstance(value, list):
        return [_expand(item, size, copies) for item in value]
    if isinstance(value, dict):
        return {key: _expand(item, size, copies) for key, item in value.items()}
    return value
