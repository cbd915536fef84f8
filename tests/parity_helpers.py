"""Helpers shared by the parity tests: eval-mode logits and a non-vacuous closeness check."""

from __future__ import annotations

import torch

PARITY_ATOL = 1e-5  # max abs logit difference allowed against the reference implementation


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    return model(**batch).logits


def assert_parity(ours: torch.Tensor, reference: torch.Tensor, base: torch.Tensor, what: str = "adapter") -> None:
    """``ours`` equals ``reference`` within PARITY_ATOL, and the reference really differs from ``base``."""
    assert (reference - base).abs().max() > 1e-2 * base.abs().max(), f"{what} had no effect: vacuous parity"
    assert (ours - reference).abs().max().item() <= PARITY_ATOL
