"""Per-example adapter routing: each row of a batch runs its own task's adapters, in training too.

HF PEFT mixes adapters within a batch only at inference; here a context manager makes every wrapper
layer of the model route rows to their adapters for the duration of a forward *and* backward pass:

    with row_adapters(model, [["default", "qa"], ["default", "ner"], ...]):   # one chain per row
        out = heads(model, batch, task=row_tasks)

Inside the block each wrapper layer computes, for an input ``x`` of shape (B, ...):

    y = base(x)                                    once, for all rows (the frozen base)
    y[R_c] += Σ_{n ∈ c} Δ_n(x[R_c])                for every distinct chain c, rows R_c = {b : chain_b = c}

with ``Δ_n`` the adapter's own contribution, in the order of the chain — the same arithmetic as
running the rows of ``R_c`` alone with ``tuners.set_active(model, c)``. The rows are a partition of the
batch, so the adapters do exactly the work of one pass (only the number of small matmuls grows with
the number of distinct chains); the base layer runs once.

How the code maps to it: the context temporarily sets an instance ``forward`` on each wrapper layer
(nothing in ``tunelab.tuners`` is edited) and removes it on exit, even if the forward raises.
Fast paths read the layers' public per-adapter parameters:

- LoRA (``lora_A``, ``lora_B``, ``lora_dropout``, ``scaling``): ``Δ_n(x) = s_n B_n A_n drop_n(x)``;
- bottleneck adapters (``adapters[n]`` on the sub-layer output ``h``): ``Δ_n(h) = adapter_n(h)``.

Any other wrapper (DoRA, (IA)³, Compacter, ...) falls back to running the whole wrapped layer once per
distinct chain on its rows (exact; the base runs once per chain). Methods that change the sequence
(prompt / prefix tuning) are not row-wise: their layers are refused with a one-line error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import MethodType

import torch
from torch import nn

from tunelab import tuners
from tunelab.errors import MethodError


def chain_groups(chains: Sequence[Sequence[str]]) -> dict[tuple[str, ...], list[int]]:
    """``{chain: rows}`` in first-appearance order."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for row, chain in enumerate(chains):
        groups.setdefault(tuple(chain), []).append(row)
    return groups


def _rows(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _lora_forward(layer: nn.Module, groups: dict, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)  # (B, ..., out)
    for chain, rows in groups.items():
        names = [n for n in chain if n in layer.lora_A and n not in layer.merged_adapters]
        if not names:
            continue
        index = _rows(rows, x.device)
        xs = x.index_select(0, index)
        part = result.index_select(0, index)
        start = part
        for name in names:
            lora_A = layer.lora_A[name]
            hidden = lora_A(layer.lora_dropout[name](xs.to(lora_A.weight.dtype)))  # (n, ..., r)
            part = torch.add(part, layer.lora_B[name](hidden).to(part.dtype), alpha=layer.scaling[name])
        result = result.index_add(0, index, part - start) if len(groups) > 1 else part
    return result


def _bottleneck_forward(layer: nn.Module, groups: dict, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    h = layer.base_layer(x, *args, **kwargs)  # (B, ..., d)
    out = h
    for chain, rows in groups.items():
        names = [n for n in chain if n in layer.adapters and layer.runs(n)]
        if not names:
            continue
        index = _rows(rows, h.device)
        hs = h.index_select(0, index)
        xs = hs.to(torch.float32) if hs.dtype not in (torch.float32, torch.float64) else hs
        delta = sum(layer.adapters[name](xs) for name in names).to(h.dtype)  # (n, ..., d)
        out = out.index_add(0, index, delta) if len(groups) > 1 else h + delta
    return out


def _generic_forward(layer: nn.Module, original, groups: dict, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    saved = layer.active_adapters
    pieces, order = [], []
    try:
        for chain, rows in groups.items():
            layer.set_active(list(chain))
            index = _rows(rows, x.device)
            pieces.append(original(x.index_select(0, index), *args, **kwargs))
            order.append(index)
    finally:
        layer.active_adapters = saved
    out = torch.cat(pieces, 0)
    inverse = torch.empty_like(torch.cat(order))
    inverse[torch.cat(order)] = torch.arange(len(inverse), device=inverse.device)
    return out.index_select(0, inverse)


def _route(layer: nn.Module, groups: dict, batch_size: int, original):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or not isinstance(x, torch.Tensor) or x.shape[0] != batch_size:
            if self.disabled:
                return original(x, *args, **kwargs)
            raise MethodError(f"per-row adapter routing: {type(self).__name__} got an input whose first dimension "
                              f"is not the batch ({batch_size}); use per-batch task switching for this method")
        if self.merged_adapters:
            raise MethodError("per-row adapter routing needs unmerged adapters; call tuners.unmerge(model) first")
        if hasattr(self, "lora_A") and not getattr(self, "variants", None):
            return _lora_forward(self, groups, x, *args, **kwargs)
        if hasattr(self, "adapters") and hasattr(self, "runs") and getattr(self, "parallel_names", None) is None:
            return _bottleneck_forward(self, groups, x, *args, **kwargs)
        return _generic_forward(self, original, groups, x, *args, **kwargs)

    return MethodType(forward, layer)


ROW_WISE_REFUSED = ("PromptLearningLayer", "PromptLayer")  # prompt methods change the sequence, not rows


@contextmanager
def row_adapters(model: nn.Module, chains: Sequence[Sequence[str]]) -> Iterator[nn.Module]:
    """Within the block, row ``b`` of the model's input runs the adapters ``chains[b]`` (see module doc).

    Args:
        model: a model with adapters (``tuners.apply``); every adapter named in ``chains`` must exist.
        chains: one list of adapter names per row (``[]``: the base model for that row).
    """
    known = set(tuners.adapters(model))
    unknown = sorted({n for chain in chains for n in chain} - known)
    if unknown:
        raise MethodError(f"per-row routing: unknown adapter {unknown[0]!r}; the model has: {', '.join(sorted(known))}")
    groups = chain_groups(chains)
    patched = []
    try:
        for _, layer in tuners.tuner_layers(model):
            if any(k.__name__ in ROW_WISE_REFUSED for k in type(layer).__mro__) or "forward" in vars(layer):
                raise MethodError(f"per-row adapter routing does not support {type(layer).__name__} layers; "
                                  "use switching: batch")
            layer.forward = _route(layer, groups, len(chains), type(layer).forward.__get__(layer))
            patched.append(layer)
        yield model
    finally:
        for layer in patched:
            del layer.forward
