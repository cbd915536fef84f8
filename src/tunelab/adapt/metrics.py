"""Continual-learning metrics from the accuracy matrix R[i][j] (score after stage i on domain j's test data).

With T stages, R ∈ ℝ^{T×T} (the runner's ``stage_matrix`` with ``eval.cross_stages: all``), and b_j the
score of the *untrained* model on domain j:

- average accuracy (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory", arXiv:1706.08840):
  ACC = (1/T) Σ_j R[T−1][j]
- backward transfer: BWT = 1/(T−1) Σ_{j<T−1} (R[T−1][j] − R[j][j])   (negative = forgetting)
- forward transfer:  FWT = 1/(T−1) Σ_{j≥1} (R[j−1][j] − b_j)           (what earlier stages give a domain
  before it is trained on)
- average forgetting (Chaudhry et al. 2018, "Riemannian Walk", arXiv:1801.10112; Avalanche's
  ``forgetting``): f_j = max_{l ∈ [j, T−2]} R[l][j] − R[T−1][j] for j < T−1, F = mean_j f_j — the drop
  from the best score a domain ever had after being learnt to its final score (≥ 0 here, unlike BWT
  which can be positive).

``b`` is the runner's ``stage_matrix["untuned"]`` (the model before any training, scored on every
stage's test data). Without it, a first stage named ``base`` that trains nothing (objective ``icl``
with ``k: 0`` and ``train.max_steps: 1``) gives the same row: :func:`split_base` removes that stage's
row and column and returns its row as b. With neither, FWT is None.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]
BASE_STAGE = "base"


def _check(R: Matrix) -> int:
    size = len(R)
    if size == 0 or any(len(row) != size for row in R):
        raise ValueError(f"R must be a non-empty square matrix, got {size} rows of lengths {[len(r) for r in R]}")
    return size


def average_accuracy(R: Matrix) -> float:
    """ACC = mean of the last row."""
    size = _check(R)
    return statistics.fmean(float(R[size - 1][j]) for j in range(size))


def backward_transfer(R: Matrix) -> float | None:
    """BWT = mean_{j<T−1} (R[T−1][j] − R[j][j]); None for a single stage."""
    size = _check(R)
    if size < 2:
        return None
    return statistics.fmean(float(R[size - 1][j]) - float(R[j][j]) for j in range(size - 1))


def forward_transfer(R: Matrix, base: Sequence[float] | None) -> float | None:
    """FWT = mean_{j≥1} (R[j−1][j] − b_j); None without base scores, a single stage or missing entries."""
    size = _check(R)
    if base is None or size < 2 or any(R[j - 1][j] is None for j in range(1, size)):
        return None
    return statistics.fmean(float(R[j - 1][j]) - float(base[j]) for j in range(1, size))


def forgetting(R: Matrix) -> list[float]:
    """Per-domain forgetting f_j = max_{l∈[j,T−2]} R[l][j] − R[T−1][j], for j < T−1."""
    size = _check(R)
    return [max(float(R[i][j]) for i in range(j, size - 1)) - float(R[size - 1][j]) for j in range(size - 1)]


def average_forgetting(R: Matrix) -> float | None:
    """F = mean_j f_j; None for a single stage."""
    values = forgetting(R)
    return statistics.fmean(values) if values else None


def split_base(names: Sequence[str], R: Matrix, base_stage: str = BASE_STAGE
               ) -> tuple[list[str], list[list[float | None]], list[float] | None]:
    """``(names, R, b)`` with a leading ``base`` stage removed and its row returned as b (else b = None)."""
    if names and names[0] == base_stage:
        return list(names[1:]), [list(row[1:]) for row in R[1:]], list(R[0][1:])
    return list(names), [list(row) for row in R], None


def summary(names: Sequence[str], R: Matrix, untuned: Sequence[float] | None = None,
            base_stage: str = BASE_STAGE) -> dict[str, float | None]:
    """ACC, BWT, FWT, average forgetting and the final in-domain score of one stage matrix.

    ``untuned`` is b over all of ``names`` (the runner's ``stage_matrix["untuned"]``), else a leading
    ``base`` stage supplies it.
    """
    had_base = bool(names) and names[0] == base_stage
    names, R, base = split_base(names, R, base_stage)
    if untuned is not None:
        base = list(untuned[1:]) if had_base else list(untuned)
    size = _check(R)
    return {"acc": average_accuracy(R), "bwt": backward_transfer(R), "fwt": forward_transfer(R, base),
            "forgetting": average_forgetting(R), "final_in_domain": float(R[size - 1][size - 1]),
            "stages": size}
