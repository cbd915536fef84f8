"""What every distillation loss shares: the ignore label, masks and the positional reduction."""

from __future__ import annotations

import torch

from tunelab import IGNORE_INDEX  # the one definition; re-exported for older imports


def mask_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool mask, True where ``labels != IGNORE_INDEX``."""
    return labels != IGNORE_INDEX


def reduce_positions(values: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce per-position values (B, T) over the positions that ``mask`` keeps.

    ``"mean"`` divides by the number of kept positions (at least 1, so an all-masked batch gives 0,
    not NaN); ``"sum"`` sums them; ``"none"`` returns ``values`` with masked positions zeroed.
    """
    if mask is not None:
        keep = mask.to(values.dtype)  # (B, T)
        values = values * keep
        count = keep.sum().clamp_min(1.0)
    else:
        count = values.numel()
    if reduction == "mean":
        return values.sum() / count
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
