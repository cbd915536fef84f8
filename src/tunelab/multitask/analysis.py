"""Did multi-task learning help? Δp against single-task baselines, and pairwise transfer.

Δp (Maninis et al., CVPR 2019; LibMTL's ``count_improvement``; Vandenhende et al. 2021) is the mean,
over tasks, of the mean over each task's metrics of the sign-corrected relative change, in percent:

    Δp = 100 · (1/T) Σ_t (1/|M_t|) Σ_{m ∈ M_t} (-1)^{l_m} (M_multi,t,m − M_single,t,m) / M_single,t,m

with ``l_m = 1`` when lower is better for metric ``m`` (a loss, perplexity) and 0 when higher is
better. Δp > 0: the multi-task model beats the single-task models on average.

The pairwise transfer matrix (Standley et al., ICML 2020): ``T[i][j]`` is the relative change (%) in
task ``i``'s score when it trains together with task ``j`` instead of alone,
``100 (S_{i,j}(i) − S_i(i)) / S_i(i)``; the diagonal is undefined (None). Positive: ``j`` helps ``i``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

LOWER_IS_BETTER = frozenset({"loss", "perplexity", "eval_loss", "error", "wer", "cer"})


def delta_p(multi: Mapping[str, Mapping[str, float]], single: Mapping[str, Mapping[str, float]],
            lower_is_better: Collection[str] = LOWER_IS_BETTER) -> float:
    """Δp in percent (the equation above).

    Args:
        multi: ``{task: {metric: value}}`` of the multi-task model.
        single: the same of the single-task baselines; only tasks and metrics present in both count.
        lower_is_better: metric names where lower is better.
    """
    per_task = []
    for task, baseline in single.items():
        if task not in multi:
            continue
        changes = []
        for metric, base in baseline.items():
            if metric not in multi[task] or base == 0:
                continue
            sign = -1.0 if metric in lower_is_better else 1.0
            changes.append(sign * (multi[task][metric] - base) / abs(base))
        if changes:
            per_task.append(sum(changes) / len(changes))
    if not per_task:
        raise ValueError("delta_p: no task has a metric in both the multi-task and the single-task results")
    return 100.0 * sum(per_task) / len(per_task)


def transfer_matrix(tasks: Sequence[str], single: Mapping[str, float],
                    pairs: Mapping[tuple[str, str], float]) -> list[list[float | None]]:
    """``T[i][j] = 100 (pairs[(i, j)] − single[i]) / single[i]`` (None on the diagonal or when missing).

    Args:
        tasks: the task order of rows and columns.
        single: each task's score trained alone.
        pairs: ``{(i, j): task i's score when trained with j}``.
    """
    matrix: list[list[float | None]] = []
    for i in tasks:
        row: list[float | None] = []
        for j in tasks:
            value = pairs.get((i, j))
            base = single.get(i)
            row.append(None if i == j or value is None or not base else 100.0 * (value - base) / abs(base))
        matrix.append(row)
    return matrix


def task_metrics(metrics: Mapping[str, float], skip: Collection[str] = ("score", "own_parameters", "answered")
                 ) -> dict[str, dict[str, float]]:
    """``{"qa/exact_match": 0.5, ...}`` -> ``{"qa": {"exact_match": 0.5}}`` (task-level quality metrics only:
    ``skip`` drops the summary score and the diagnostics, parameters and the QA ``answered`` share)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        task, sep, metric = key.partition("/")
        if sep and metric not in skip and "/" not in metric and isinstance(value, (int, float)):
            out.setdefault(task, {})[metric] = float(value)
    return out
