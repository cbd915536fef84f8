"""The stage section of a report: the cross-evaluation matrix of staged experiments.

After stage ``i`` the model is scored on the test data of stage ``j``: ``R[i][j]`` (``stage_matrix`` in
each result file). The section shows ``R`` per method (averaged over seeds) as a table and a heatmap —
the accuracy matrix that continual learning and multi-stage distillation read forgetting and transfer
from.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from tunelab.experiments.plots import figure_png


def stage_matrices(results: list[dict]) -> dict[str, dict]:
    """``{method label: {"stages": names, "scores": mean R[i][j] over seeds (None where not evaluated)}}``."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        if result.get("stage_matrix"):
            groups[result["method_label"]].append(result["stage_matrix"])
    matrices = {}
    for label, group in groups.items():
        names = group[0]["stages"]
        size = len(names)
        mean = [[None] * size for _ in range(size)]
        for i in range(size):
            for j in range(size):
                values = [m["scores"][i][j] for m in group if m["scores"][i][j] is not None]
                mean[i][j] = statistics.fmean(values) if values else None
        matrices[label] = {"stages": names, "scores": mean, "seeds": len(group)}
    return matrices


def markdown_section(matrices: dict[str, dict]) -> str:
    """Markdown tables of R, one per method; empty when no result has stages."""
    if not matrices:
        return ""
    parts = ["## Stages: score after each stage (rows) on each stage's test data (columns)\n"]
    for label, matrix in matrices.items():
        names = matrix["stages"]
        parts.append(f"**{label}** ({matrix['seeds']} seed(s))\n")
        parts.append("| after \\ test on | " + " | ".join(names) + " |")
        parts.append("|---|" + "---:|" * len(names))
        for name, row in zip(names, matrix["scores"], strict=True):
            cells = " | ".join("–" if v is None else f"{v:.4f}" for v in row)
            parts.append(f"| {name} | {cells} |")
        parts.append("")
    return "\n".join(parts) + "\n"


def plot_stage_matrices(matrices: dict[str, dict]) -> bytes | None:
    """One heatmap per method (colour scale 0..1 shared by all), or None without stages."""
    if not matrices:
        return None

    def draw(figure):
        axes = figure.subplots(1, len(matrices), squeeze=False)[0]
        image = None
        for axis, (label, matrix) in zip(axes, matrices.items(), strict=True):
            names = matrix["stages"]
            values = [[float("nan") if v is None else v for v in row] for row in matrix["scores"]]
            image = axis.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
            axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
            axis.set_yticks(range(len(names)), names, fontsize=7)
            axis.set_xlabel("test data of stage")
            axis.set_ylabel("after stage")
            axis.set_title(label, fontsize=9)
            for i, row in enumerate(matrix["scores"]):
                for j, v in enumerate(row):
                    if v is not None:
                        axis.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
        figure.colorbar(image, ax=list(axes), label="held-out score")
        figure.suptitle("Score after each stage on every stage's test data")

    return figure_png(draw, width=max(4.0, 3.2 * len(matrices)), figure_level=True)
