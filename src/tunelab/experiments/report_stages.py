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

    columns = min(3, len(matrices))  # wrap into rows of three so labels never overlap
    rows = -(-len(matrices) // columns)

    def draw(figure):
        grid = figure.subplots(rows, columns, squeeze=False)
        axes = [axis for row in grid for axis in row]
        image = None
        for index, (axis, (label, matrix)) in enumerate(zip(axes, matrices.items(), strict=False)):
            names = matrix["stages"]
            values = [[float("nan") if v is None else v for v in row] for row in matrix["scores"]]
            image = axis.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
            axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
            axis.set_yticks(range(len(names)), names, fontsize=7)
            axis.set_xlabel("test data of stage", fontsize=8)
            if index % columns == 0:
                axis.set_ylabel("after stage", fontsize=8)
            axis.set_title(label, fontsize=9)
            for i, row in enumerate(matrix["scores"]):
                for j, v in enumerate(row):
                    if v is not None:
                        axis.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
        for axis in axes[len(matrices):]:
            axis.axis("off")
        figure.subplots_adjust(wspace=0.45, hspace=0.7)
        figure.colorbar(image, ax=axes, label="held-out score", shrink=0.8)
        figure.suptitle("Score after each stage (rows) on every stage's test data (columns)")

    return figure_png(draw, width=max(4.5, 3.6 * columns + 1.0), height=3.4 * rows + 0.6, figure_level=True)


# ----------------------------------------------------------------------------- domain adaptation / continual
def adapt_section(results: list[dict], matrices: dict[str, dict]) -> str:
    """Continual-learning metrics per method label (ACC, BWT, FWT, forgetting), routing and transfer tables.

    Each part is empty when the results hold nothing for it (see :mod:`tunelab.adapt.metrics`,
    :mod:`tunelab.adapt.router`, :mod:`tunelab.adapt.analysis`).
    """
    from tunelab.experiments.report_probe import mean_change_by_label

    sequences = {label: matrix for label, matrix in matrices.items() if label in domain_sequences(results)}
    return (continual_table(sequences, untuned_scores(results), mean_change_by_label(results))
            + routing_table(results) + transfer_table(results))


def domain_sequences(results: list[dict]) -> set[str]:
    """Method labels whose stages are a sequence of domains: one objective in every stage (a router stage
    aside). ACC, BWT and forgetting average R over stages, which means something only when every stage
    is scored by the same kind of task: not for DAPT's language-modelling stage (its score is a negated
    loss) before a fine-tuning stage, nor for SFT → reward → DPO pipelines."""
    objectives: dict[str, set[str]] = defaultdict(set)
    for result in results:
        for stage in result.get("stages") or []:
            if stage.get("name") != ROUTE_STAGE:
                objectives[result["method_label"]].add(stage.get("objective"))
    return {label for label, found in objectives.items() if len(found) == 1}


def untuned_scores(results: list[dict]) -> dict[str, list[float]]:
    """``{method label: mean untuned score per stage}`` from the runner's ``stage_matrix["untuned"]``."""
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for result in results:
        values = (result.get("stage_matrix") or {}).get("untuned")
        if values and all(v is not None for v in values):
            groups[result["method_label"]].append(values)
    return {label: [statistics.fmean(col) for col in zip(*rows, strict=True)] for label, rows in groups.items()}


ROUTE_STAGE = "route"  # the stage that trains a domain router (configs/continual.yaml)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def continual_table(matrices: dict[str, dict], untuned: dict[str, list[float]] | None = None,
                    general: dict[str, float] | None = None) -> str:
    """ACC, BWT, FWT (vs the untuned model), average forgetting and final in-domain score per method;
    with ``general`` (``{label: mean Δ}`` of the general probe, ``eval.general_probe``) a column of the
    general held-out perplexity's relative change."""
    from tunelab.adapt import metrics

    rows = []
    for label, matrix in matrices.items():
        names, scores = matrix["stages"], matrix["scores"]
        base = (untuned or {}).get(label)
        keep = [i for i, name in enumerate(names) if name != ROUTE_STAGE]  # a router stage is no domain
        names, scores = [names[i] for i in keep], [[scores[i][j] for j in keep] for i in keep]
        base = [base[i] for i in keep] if base is not None else None
        core_names, core, _ = metrics.split_base(names, scores)
        if len(core_names) < 2 or any(core[-1][j] is None for j in range(len(core))):
            continue
        s = metrics.summary(names, scores, base)
        probe = "" if not general else " – |" if label not in general else f" {100 * general[label]:+.2f}% |"
        rows.append(f"| {label} | {_fmt(s['acc'])} | {_fmt(s['bwt'], True)} | {_fmt(s['fwt'], True)} | "
                    f"{_fmt(s['forgetting'])} | {_fmt(s['final_in_domain'])} |{probe}")
    if not rows:
        return ""
    head = ("## Continual learning: average accuracy, transfer and forgetting\n\n"
            "ACC = mean of the last row; BWT = mean (R[T−1][j] − R[j][j]); FWT = mean (R[j−1][j] − b_j), b = the "
            "untrained model; forgetting = mean (max_{l≥j} R[l][j] − R[T−1][j])"
            + ("; general ppl Δ = general held-out perplexity after the last stage / untuned − 1, as in the "
               "Forgetting section" if general else "")
            + " (docs/adapt.md).\n\n"
            "| method | ACC | BWT | FWT | forgetting | final in-domain |" + (" general ppl Δ |" if general else "")
            + "\n|---|---:|---:|---:|---:|---:|" + ("---:|" if general else ""))
    return head + "\n" + "\n".join(rows) + "\n\n"


def routing_table(results: list[dict]) -> str:
    """Routing accuracy and routed vs oracle score of runs whose last stage is a ``router``."""
    rows = []
    for result in results:
        stages = result.get("stages") or []
        last = stages[-1]["metrics"] if stages else result.get("metrics", {})
        if not last or "routing_accuracy" not in last:
            continue
        rows.append(f"| {result['run_id']} | {last['routing_accuracy']:.4f} | {last['score']:.4f} | "
                    f"{last['oracle_score']:.4f} | {last['routed_vs_oracle']:.4f} |")
    if not rows:
        return ""
    return ("## Domain routing\n\n| run | routing accuracy | routed score | oracle score | routed / oracle |\n"
            "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n")


def transfer_table(results: list[dict]) -> str:
    """Train-on-i / test-on-j matrices from runs whose metrics carry ``<domain>/score`` probes."""
    from tunelab.adapt.analysis import transfer_matrices

    parts = []
    for label, (trained, tested, values) in transfer_matrices(results).items():
        parts.append(f"**{label}** (rows: trained on; columns: tested on)\n")
        parts.append("| trained on \\ tested on | " + " | ".join(tested) + " |")
        parts.append("|---|" + "---:|" * len(tested))
        for name, row in zip(trained, values, strict=True):
            parts.append(f"| {name} | " + " | ".join(_fmt(v) for v in row) + " |")
        parts.append("")
    if not parts:
        return ""
    return "## Cross-domain transfer\n\n" + "\n".join(parts) + "\n"
