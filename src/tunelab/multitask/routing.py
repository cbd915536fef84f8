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

- LoRA (``lora_A``, ``lora_B``, ``lora_dropout``, ``scaling``): ``Δ_n(x) = s_n B_n A_n drop_n(x)``. When
  the adapters share one rank and have no active dropout, their factors are stacked and every row's
  ``(A, B, s)`` gathered, so all chains run in two batched matmuls per chain position (no per-chain
  row selection, whose backward scatters into full-size zeros); otherwise, when each chain's rows are
  one contiguous block (the multi-task sampler orders a mixed batch by task), the input is split into
  views and the blocks' outputs concatenated (dropout, mixed ranks); otherwise per chain on its rows;
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
    chains = {chain: [n for n in chain if n in layer.lora_A and n not in layer.merged_adapters] for chain in groups}
    if len(groups) > 1 and _stackable(layer, chains):
        return _lora_gathered(layer, groups, chains, x, result)
    if len(groups) > 1 and (sizes := contiguous_sizes(groups, x.shape[0])):
        return _lora_split(layer, groups, chains, sizes, x, result)
    out = None  # one copy of the base output, whose rows each chain overwrites in place
    for chain, rows in groups.items():
        names = chains[chain]
        if not names:
            continue
        if len(groups) == 1:
            x_rows, part = x, result
        else:
            index = _rows(rows, x.device)
            x_rows, part = x.index_select(0, index), result.index_select(0, index)
        part = _lora_terms(layer, names, x_rows, part)
        if len(groups) == 1:
            return part
        if out is None:
            out = result.clone()
        out.index_copy_(0, index, part)
    return result if out is None else out


def _lora_terms(layer: nn.Module, names: list[str], x_rows: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``part + Σ_n s_n B_n A_n drop_n(x_rows)`` over ``names`` in order: the arithmetic of a LoRA layer
    run on these rows alone, term by term."""
    for name in names:
        lora_A = layer.lora_A[name]
        hidden = lora_A(layer.lora_dropout[name](x_rows.to(lora_A.weight.dtype)))  # (n, ..., r)
        part = torch.add(part, layer.lora_B[name](hidden).to(part.dtype), alpha=layer.scaling[name])
    return part


def contiguous_sizes(groups: dict, batch: int) -> list[int] | None:
    """Row counts of the chains in order when each chain's rows are one block and the blocks tile the
    batch in first-appearance order (the multi-task sampler orders a mixed batch by task); else None."""
    sizes, start = [], 0
    for rows in groups.values():
        if rows[0] != start or rows[-1] != start + len(rows) - 1:
            return None
        sizes.append(len(rows))
        start += len(rows)
    return sizes if start == batch else None


def _lora_split(layer: nn.Module, groups: dict, chains: dict, sizes: list[int], x: torch.Tensor,
                result: torch.Tensor) -> torch.Tensor:
    """Chains on contiguous row blocks: ``torch.split`` into views, each block's LoRA terms as plain
    matmuls, one ``torch.cat`` back — no index_select copies, no gathered weights, and a backward that
    concatenates the blocks' gradients instead of scattering each into a full-size zero tensor. Any
    ranks, any dropout: the arithmetic of each block run alone."""
    return torch.cat([_lora_terms(layer, chains[chain], x_rows, part)
                      for chain, x_rows, part in zip(groups, x.split(sizes), result.split(sizes), strict=True)])


def _stackable(layer: nn.Module, chains: dict) -> bool:
    """Every adapter the chains use here has one rank and no active dropout: their factors stack."""
    names = {n for names in chains.values() for n in names}
    ranks = {layer.lora_A[n].weight.shape[0] for n in names}
    dropout_free = all(isinstance(layer.lora_dropout[n], nn.Identity) or not layer.training for n in names)
    return len(ranks) == 1 and dropout_free


def _lora_gathered(layer: nn.Module, groups: dict, chains: dict, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """All chains at once: per chain position k, each row's (A, B, s) gathered from the stacked adapters,

        y_b += s_{n_bk} B_{n_bk} A_{n_bk} x_b      (two batched matmuls; rows without a k-th adapter add 0)

    instead of two small matmuls per chain on index-selected rows (whose backward scatters into full-size
    zero tensors). Measured (benchmarks/multitask_step_time.py, per-task adapters, four tasks): a mixed
    batch steps in 1.19x the time of a one-task batch of the same shape (2 threads), against ~1.8x before."""
    names = sorted({n for names in chains.values() for n in names})
    slot = {name: i for i, name in enumerate(names)}  # len(names) = the zero adapter
    weight_A = torch.stack([layer.lora_A[n].weight for n in names])  # (N, r, in)
    weight_B = torch.stack([layer.lora_B[n].weight for n in names])  # (N, out, r)
    zero_A, zero_B = weight_A.new_zeros(1, *weight_A.shape[1:]), weight_B.new_zeros(1, *weight_B.shape[1:])
    weight_A, weight_B = torch.cat([weight_A, zero_A]), torch.cat([weight_B, zero_B])
    scaling = torch.tensor([float(layer.scaling[n]) for n in names] + [0.0], dtype=result.dtype, device=x.device)
    batch = x.shape[0]
    row_chain = [None] * batch
    for chain, rows in groups.items():
        for row in rows:
            row_chain[row] = chains[chain]
    flat = x.reshape(batch, -1, x.shape[-1]).to(weight_A.dtype)  # (B, L, in)
    out = result.reshape(batch, -1, result.shape[-1])  # (B, L, out)
    for position in range(max(len(c) for c in row_chain)):
        ids = torch.tensor([slot[c[position]] if position < len(c) else len(names) for c in row_chain],
                           device=x.device)
        hidden = torch.bmm(flat, weight_A[ids].transpose(1, 2))  # (B, L, r)
        scaled_B = weight_B[ids] * scaling[ids].view(batch, 1, 1).to(weight_B.dtype)  # (B, out, r): s folded in
        out = torch.baddbmm(out, hidden.to(out.dtype), scaled_B.transpose(1, 2).to(out.dtype))  # out + s B A x
    return out.reshape(result.shape)


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


def _refused(layer: nn.Module) -> bool:
    return any(k.__name__ in ROW_WISE_REFUSED for k in type(layer).__mro__)


def routable(model: nn.Module) -> bool:
    """Whether :func:`row_adapters` can route ``model``'s adapter layers (False for prompt methods)."""
    return not any(_refused(layer) for _, layer in tuners.tuner_layers(model))


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
            if _refused(layer) or "forward" in vars(layer):
                raise MethodError(f"per-row adapter routing does not support {type(layer).__name__} layers; "
                                  "use switching: batch")
            layer.forward = _route(layer, groups, len(chains), type(layer).forward.__get__(layer))
            patched.append(layer)
        yield model
    finally:
        for layer in patched:
            del layer.forward
