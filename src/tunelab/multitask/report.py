"""The multi-task section of a report: single-task vs multi-task per task, Δp with its 95% CI.

A run holds *single-task* cells (objective ``multitask`` / ``multitask_encoder`` with one trained task:
``objective.options.train_tasks: [t]``) and *multi-task* cells (several trained tasks). Each multi-task
set-up (its run id without the seed) is compared, seed by seed, with the single-task cells of the same
seed and training size: per task the mean score of both, and Δp (:func:`~tunelab.multitask.analysis.delta_p`)
over all tasks and metrics, as mean ± 95% CI over seeds. Pairs of tasks give a transfer matrix.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict

from tunelab.experiments.plots import ci95
from tunelab.multitask.analysis import delta_p, task_metrics, transfer_matrix

OBJECTIVES = ("multitask", "multitask_encoder")


def _trained(result: dict) -> list[str] | None:
    config = result.get("config") or {}
    objective = config.get("objective") or {}
    if objective.get("name") not in OBJECTIVES:
        return None
    options = objective.get("options") or {}
    tasks = options.get("train_tasks") or [t["name"] for t in options.get("tasks", [])]
    return list(tasks)


def _setup(result: dict) -> str:
    return re.sub(r"(^|-)s\d+(?=-|$)", "", result["run_id"]).strip("-")


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {ci95(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def comparisons(results: list[dict]) -> dict[str, dict]:
    """``{multi set-up: {"single": {task: [scores]}, "multi": {task: [scores]}, "delta_p": [one per seed]}}``."""
    singles: dict[tuple, dict[str, dict]] = defaultdict(dict)  # (seed, size) -> task -> that cell's metrics
    multis = []
    for result in results:
        trained = _trained(result)
        if trained and len(trained) == 1:
            singles[(result["seed"], result["train_size"])][trained[0]] = result["metrics"]
        elif trained:
            multis.append((result, trained))
    out: dict[str, dict] = {}
    for result, trained in multis:
        baseline = singles.get((result["seed"], result["train_size"]), {})
        tasks = [t for t in trained if t in baseline and f"{t}/score" in result["metrics"]]
        if not tasks:
            continue
        entry = out.setdefault(_setup(result), {"single": defaultdict(list), "multi": defaultdict(list), "delta_p": []})
        for task in tasks:
            entry["single"][task].append(baseline[task][f"{task}/score"])
            entry["multi"][task].append(result["metrics"][f"{task}/score"])
        multi = task_metrics(result["metrics"])
        try:
            entry["delta_p"].append(delta_p({t: multi.get(t, {}) for t in tasks},
                                            {t: task_metrics(baseline[t]).get(t, {}) for t in tasks}))
        except ValueError:  # every baseline metric is 0: relative change undefined
            pass
    return out


def markdown_section(results: list[dict]) -> str:
    """Tables of single vs multi per task and Δp; empty without single- and multi-task cells."""
    parts = []
    for setup, entry in comparisons(results).items():
        lines = [f"### `{setup}` vs single-task baselines\n", "| task | single-task | multi-task | change |",
                 "|---|---|---|---|"]
        for task, single in entry["single"].items():
            multi = entry["multi"][task]
            base = statistics.fmean(single)
            change = f"{(statistics.fmean(multi) - base) / abs(base) * 100:+.1f}%" if base else "-"  # undefined at 0
            lines.append(f"| {task} | {_fmt(single)} | {_fmt(multi)} | {change} |")
        values = entry["delta_p"]
        spread = f" ± {ci95(values):.2f} (95% CI over {len(values)} seeds)" if len(values) > 1 else " (one seed: no CI)"
        lines.append(f"\n**Δp = {statistics.fmean(values):+.2f}%**{spread}\n" if values else
                     "\n**Δp undefined**: the single-task baselines score 0 on every metric\n")
        parts.append("\n".join(lines))
    pairs = _pair_section(results)
    if not parts and not pairs:
        return ""
    head = ("## Multi-task vs single-task\n\nScores on each task's test data (mean ± 95% CI over seeds); Δp is "
            "the mean over tasks and metrics of the relative change vs the single-task model (LibMTL).\n\n")
    return head + "\n\n".join(parts) + pairs + "\n\n"


def _pair_section(results: list[dict]) -> str:
    single: dict[str, list[float]] = defaultdict(list)
    pairs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for result in results:
        trained = _trained(result) or []
        scores = {t: result["metrics"].get(f"{t}/score") for t in trained}
        if len(trained) == 1 and scores[trained[0]] is not None:
            single[trained[0]].append(scores[trained[0]])
        if len(trained) == 2:
            i, j = trained
            if scores[i] is not None:
                pairs[(i, j)].append(scores[i])
            if scores[j] is not None:
                pairs[(j, i)].append(scores[j])
    if not pairs:
        return ""
    tasks = sorted({t for pair in pairs for t in pair})
    matrix = transfer_matrix(tasks, {t: statistics.fmean(v) for t, v in single.items()},
                             {k: statistics.fmean(v) for k, v in pairs.items()})
    lines = ["\n\n### Pairwise transfer: change (%) in the row task's score when trained with the column task\n",
             "| task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for task, row in zip(tasks, matrix, strict=True):
        lines.append(f"| {task} | " + " | ".join("-" if v is None else f"{v:+.1f}" for v in row) + " |")
    return "\n".join(lines)
