"""The multi-task section of a report: single-task vs multi-task per task, Δp with its 95% CI.

A run holds *single-task* cells (objective ``multitask`` / ``multitask_encoder`` with one trained task:
``objective.options.train_tasks: [t]``) and *multi-task* cells (several trained tasks). Each multi-task
set-up (its run id without the seed) is compared, seed by seed, with the single-task cells of the same
seed and training size: per task the mean score of both, and Δp (:func:`~tunelab.multitask.analysis.delta_p`)
over all tasks and metrics, as mean ± 95% CI over seeds. Pairs of tasks give a transfer matrix (a table
and a heatmap). With several training sizes (``grid.train_sizes``), data-efficiency curves: each task's
score against its training examples, single-task vs every multi-task set-up, mean ± 95% CI over seeds.
:func:`plots` draws the figures the markdown links to (``plots/multitask_*.png``).
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict

from tunelab.experiments.plots import ci95, figure_png, score_axis
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
    curves = _efficiency_section(results)
    if not parts and not pairs and not curves:
        return ""
    head = ("## Multi-task vs single-task\n\nScores on each task's test data (mean ± 95% CI over seeds); Δp is "
            "the mean over tasks and metrics of the relative change vs the single-task model (LibMTL).\n\n")
    return head + "\n\n".join(parts) + pairs + curves + "\n\n"


def efficiency(results: list[dict]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """``{task: {curve: {training examples per task: [score per seed]}}}``; curves: ``single-task`` and each
    multi-task set-up (its run id without seed and size)."""
    out: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for result in results:
        trained = _trained(result)
        if not trained:
            continue
        size = (result.get("data_sizes") or {}).get("train_requested", result["train_size"])
        label = "single-task" if len(trained) == 1 else re.sub(r"(^|-)n\d+(?=-|$)", "", _setup(result)).strip("-")
        for task in trained:
            score = result["metrics"].get(f"{task}/score")
            if score is not None:
                out[task][label][size].append(score)
    return out


def _curves(results: list[dict]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """:func:`efficiency` for the tasks measured at two sizes or more both alone and in a multi-task set-up."""
    return {task: curves for task, curves in efficiency(results).items()
            if "single-task" in curves and len(curves) > 1 and all(len(points) > 1 for points in curves.values())}


def _efficiency_section(results: list[dict]) -> str:
    curves = _curves(results)
    if not curves:
        return ""
    lines = ["\n\n### Data efficiency: score by training examples per task (mean ± 95% CI over seeds)\n"]
    for task, by_label in curves.items():
        sizes = sorted({size for points in by_label.values() for size in points})
        lines += [f"**{task}**\n", "| set-up | " + " | ".join(str(size) for size in sizes) + " |",
                  "|---" + "|---:" * len(sizes) + "|"]
        for label, points in by_label.items():
            lines.append(f"| {label} | " + " | ".join(_fmt(points.get(size, [])) for size in sizes) + " |")
        lines.append("")
    lines.append("![data efficiency](plots/multitask_efficiency.png)")
    return "\n".join(lines)


def plots(results: list[dict]) -> dict[str, bytes]:
    """The section's figures: ``multitask_efficiency`` (curves) and ``multitask_transfer`` (heatmap), where the
    results have them."""
    out = {}
    curves = _curves(results)
    if curves:
        out["multitask_efficiency"] = _plot_efficiency(curves)
    matrix = _transfer(results)
    if matrix is not None:
        out["multitask_transfer"] = _plot_transfer(*matrix)
    return out


def _plot_efficiency(curves: dict) -> bytes:
    def draw(figure) -> None:
        axes = figure.subplots(1, len(curves), squeeze=False)[0]
        for axis, (task, by_label) in zip(axes, curves.items(), strict=True):
            values = []
            for label, points in by_label.items():
                sizes = sorted(points)
                means = [statistics.fmean(points[s]) for s in sizes]
                axis.errorbar(sizes, means, yerr=[ci95(points[s]) for s in sizes], marker="o", capsize=3,
                              label=label, linestyle="--" if label == "single-task" else "-")
                values += means
            axis.set_xscale("log")
            axis.set_xlabel("training examples per task")
            axis.set_title(task, fontsize=9)
            score_axis(axis, values, label=f"{task} score")
            axis.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        figure.tight_layout()

    return figure_png(draw, width=max(4.0, 3.2 * len(curves)), height=3.4, figure_level=True)


def _plot_transfer(tasks: list[str], matrix: list[list[float | None]]) -> bytes:
    def draw(axis) -> None:
        values = [[float("nan") if v is None else v for v in row] for row in matrix]
        bound = max([abs(v) for row in matrix for v in row if v is not None], default=1.0) or 1.0
        image = axis.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound)
        axis.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
        axis.set_yticks(range(len(tasks)), tasks, fontsize=8)
        axis.set_xlabel("trained together with")
        axis.set_ylabel("change (%) on this task")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                dark = value is not None and abs(value) > 0.6 * bound
                axis.text(j, i, "–" if value is None else f"{value:+.1f}", ha="center", va="center", fontsize=8,
                          color="white" if dark else "black")
        axis.figure.colorbar(image, ax=axis, label="% change vs trained alone")

    return figure_png(draw, width=5.2, height=4.2)


def _transfer(results: list[dict]) -> tuple[list[str], list[list[float | None]]] | None:
    """``(tasks, T)``: the pairwise transfer matrix of the cells that trained two tasks; None without such cells."""
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
        return None
    tasks = sorted({t for pair in pairs for t in pair})
    return tasks, transfer_matrix(tasks, {t: statistics.fmean(v) for t, v in single.items()},
                                  {k: statistics.fmean(v) for k, v in pairs.items()})


def _pair_section(results: list[dict]) -> str:
    transfer = _transfer(results)
    if transfer is None:
        return ""
    tasks, matrix = transfer
    lines = ["\n\n### Pairwise transfer: change (%) in the row task's score when trained with the column task\n",
             "| task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for task, row in zip(tasks, matrix, strict=True):
        lines.append(f"| {task} | " + " | ".join("-" if v is None else f"{v:+.1f}" for v in row) + " |")
    lines.append("\n![transfer matrix](plots/multitask_transfer.png)")
    return "\n".join(lines)
