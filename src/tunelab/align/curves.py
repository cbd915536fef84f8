"""The report's preference-training curves: implicit reward margin, reward accuracy and KL, per step.

The ``dpo`` and ``kto`` objectives log, every ``train.log_every`` steps, TRL's metric names averaged
over the steps since the last log:

    rewards/margins      mean of r_w − r_l, with r = β (log π(y|x) − log π_ref(y|x))   (the implicit reward)
    rewards/accuracies   share of pairs with r_w > r_l                                  (dpo)
    kl                   mean of log π − log π_ref over the batch's completions (nats; dpo only:
                         kto logs its z₀ estimate under that name, which is left out)

These are *training-batch* figures (the held-out ones are in the results table). A margin that grows
while ``kl`` falls far below 0 is DPO pushing both completions down (the chosen one less), the
failure RPO's ``sft_weight`` counters. Cells sharing a label and stage are averaged over seeds at each
logged step. :func:`markdown_section` gives the section (a table of the first and last logged values,
and the figure); :func:`plots` returns ``{"preference_curves": png}``; both are empty when no result
logged a margin.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from tunelab.experiments.plots import figure_png, point_colors

PLOT = "preference_curves"
KEYS = (("rewards/margins", "reward margin r_w − r_l"), ("rewards/accuracies", "reward accuracy (training batch)"),
        ("kl", "log π − log π_ref (nats, batch mean)"))


def series(results: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{curve label: {metric key: [(step, mean over seeds), ...]}}`` for every cell and stage that logged
    a reward margin; the label is the cell's method label, plus `` / stage`` for a stage of a multi-stage cell."""
    values: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for result in results:
        objectives = {stage.get("name"): stage.get("objective") for stage in result.get("stages") or []}
        for event in result.get("history") or []:
            if "rewards/margins" not in event:
                continue
            label = result["method_label"] + (f" / {event['stage']}" if event.get("stage") else "")
            objective = objectives.get(event.get("stage")) or result.get("objective")
            for key, _ in KEYS:
                if key == "kl" and objective == "kto":  # KTO's "kl" is its z0 estimate, not log π − log π_ref
                    continue
                if isinstance(event.get(key), (int, float)):
                    values[label][key][int(event["step"])].append(float(event[key]))
    return {label: {key: sorted((step, statistics.fmean(v)) for step, v in steps.items()) for key, steps in keys.items()}
            for label, keys in sorted(values.items())}


def markdown_section(results: list[dict]) -> str:
    curves = series(results)
    if not curves:
        return ""
    lines = ["## Preference training: reward margin, accuracy and KL", "",
             "Logged every `train.log_every` steps on the training batches (mean over the steps since the last "
             "log, then over seeds): the implicit-reward margin r_w − r_l (r = β log π/π_ref), the share of pairs "
             "with r_w > r_l (dpo) and the mean log π − log π_ref of the batch's completions (nats; strongly "
             "negative = both completions pushed down). Held-out figures are in the tables above.", "",
             "| cell / stage | steps logged | " + " | ".join(f"{name} first → last" for _, name in KEYS) + " |",
             "|---|---:|" + "---:|" * len(KEYS)]
    for label, keys in curves.items():
        cells = []
        for key, _ in KEYS:
            points = keys.get(key) or []
            cells.append(f"{points[0][1]:.3f} → {points[-1][1]:.3f}" if points else "–")
        logged = max(len(points) for points in keys.values())
        lines.append(f"| {label} | {logged} | " + " | ".join(cells) + " |")
    lines += ["", f"![preference training curves](plots/{PLOT}.png)", ""]
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> bytes:
    def draw(figure):
        axes = figure.subplots(1, len(KEYS))
        colors = point_colors(len(curves))
        handles = []
        for axis, (key, name) in zip(axes, KEYS, strict=True):
            for (label, keys), color in zip(curves.items(), colors, strict=True):
                points = keys.get(key) or []
                if points:
                    line, = axis.plot(*zip(*points, strict=True), color=color, linewidth=1.2, label=label)
                    if axis is axes[0]:
                        handles.append(line)
            if key == "rewards/accuracies":
                axis.set_ylim(-0.02, 1.02)
                axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
            else:
                axis.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
            axis.set_title(name, fontsize=9)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        # long cell labels: one legend under the three panels, a line per curve
        figure.legend(handles=handles, loc="lower center", fontsize=7, frameon=False)
        figure.tight_layout(rect=(0, 0.07 * len(handles) / (1 + 0.07 * len(handles)), 1, 1))
    return figure_png(draw, width=12.0, height=3.6 * (1 + 0.07 * len(curves)), figure_level=True)


def plots(results: list[dict]) -> dict[str, bytes]:
    curves = series(results)
    return {PLOT: plot(curves)} if curves else {}
