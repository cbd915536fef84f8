"""``tune_report.md`` / ``tune_report.html``: what ``tunelab tune`` tried and found.

Built from the Optuna studies (``study.trials``), never from Optuna's plotly visualisations: the
optimization history (each trial's value and the running best), the eval curves the pruner saw
(pruned trials dashed), and parameter importances (``optuna.importance.get_param_importances``,
fANOVA) — all matplotlib, embedded as base64 PNG so the HTML is one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.experiments import markdown_html
from tunelab.experiments.plots import figure_png, score_axis
from tunelab.utils import atomic_write_text


def _states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.trials:
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    return counts


def _complete(study) -> list:
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def default_trial(study):
    return next((t for t in _complete(study) if t.user_attrs.get("default")), None)


def importances(study) -> dict[str, float]:
    """fANOVA importances (empty when fewer than two finished trials or nothing varied)."""
    import optuna

    values = [t.value for t in _complete(study)]
    if len(values) < 2 or max(values) == min(values):  # nothing to explain
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def plot_history(studies: dict[str, Any], metric: str, maximize: bool) -> bytes:
    def draw(axis):
        values = []
        for label, study in studies.items():
            done = _complete(study)
            if not done:
                continue
            xs, ys = [t.number for t in done], [t.value for t in done]
            best, running = [], None
            for y in ys:
                running = y if running is None else (max(running, y) if maximize else min(running, y))
                best.append(running)
            line = axis.plot(xs, ys, "o", alpha=0.6, label=f"{label}: trial value")[0]
            # one step past the last trial, so that an improvement by the last trial shows as a step
            axis.step([*xs, xs[-1] + 0.5], [*best, best[-1]], where="post", color=line.get_color(),
                      label=f"{label}: best so far")
            values += ys
        axis.set_xlabel("trial number")
        if metric == "eval_loss":
            axis.set_ylabel("final eval loss (lower is better)")
            axis.set_ylim(bottom=0)
        else:
            score_axis(axis, values, label=f"held-out {metric}")
        axis.set_title("Optimization history")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    return figure_png(draw)


def plot_curves(studies: dict[str, Any], maximize: bool) -> bytes:
    import optuna

    def draw(axis):
        for label, study in studies.items():
            for trial in study.trials:
                points = sorted(trial.intermediate_values.items())
                if not points:
                    continue
                pruned = trial.state == optuna.trial.TrialState.PRUNED
                ys = [-v if maximize else v for _, v in points]  # back to eval loss
                axis.plot([s for s, _ in points], ys, linestyle="--" if pruned else "-", linewidth=1,
                          marker="x" if pruned else ".",  # a trial pruned at its first eval is one point
                          label=f"{label} #{trial.number}{' (pruned)' if pruned else ''}")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("eval loss")
        axis.set_ylim(bottom=0)
        axis.set_title("Eval curves seen by the median pruner (dashed: pruned)")
        axis.legend(fontsize=6, ncol=2)
        axis.grid(alpha=0.3)
    return figure_png(draw)


def plot_importance(studies: dict[str, Any]) -> bytes | None:
    table = {label: importances(study) for label, study in studies.items()}
    table = {k: v for k, v in table.items() if v}
    if not table:
        return None

    def draw(axis):
        keys = sorted({key for values in table.values() for key in values})
        width = 0.8 / len(table)
        for index, (label, values) in enumerate(table.items()):
            axis.barh([i + index * width for i in range(len(keys))], [values.get(k, 0.0) for k in keys],
                      height=width, label=label)
        axis.set_yticks([i + 0.4 - width / 2 for i in range(len(keys))], keys, fontsize=8)
        axis.set_xlim(0, 1)
        axis.set_xlabel("importance (fANOVA share of the value's variance)")
        axis.set_title("Parameter importance")
        axis.legend(fontsize=7)
    return figure_png(draw)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _space_text(key: str, dist) -> str:
    kind = dist.type + (", log" if dist.log else "")
    if dist.relative:
        kind += f", ×{dist.low:g}–{dist.high:g} of each method's own value"
    return f"`{key}` ({kind})"


def _values(trial) -> dict:
    """What the trial's cell ran with: relative factors resolved (older studies: the sampled params)."""
    return trial.user_attrs.get("values") or trial.params


def _study_lines(label: str, study, metric: str) -> list[str]:
    lines = [f"### {label} (study `{study.study_name}`)", ""]
    states = _states(study)
    lines.append("Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ".")
    best = study.best_trial if _complete(study) else None
    default = default_trial(study)
    if default is not None:
        lines.append(f"Default configuration (trial {default.number}): {metric} = {default.value:.4f}.")
    if best is not None:
        lines.append(f"Best (trial {best.number}): {metric} = {best.value:.4f} with "
                     + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in _values(best).items()) + ".")
        if default is not None and best.number != default.number:
            lines.append(f"Gain over the default: {best.value - default.value:+.4f}.")
    lines += ["", "| trial | state | " + metric + " | train s | params |", "|---:|---|---:|---:|---|"]
    for trial in study.trials:
        value = f"{trial.value:.4f}" if trial.value is not None else "–"
        if trial.state.name == "PRUNED" and trial.intermediate_values:  # Optuna stores the last curve value
            step, reported = max(trial.intermediate_values.items())
            value = f"– (eval loss {abs(reported):.3f} at step {step})"
        seconds = trial.user_attrs.get("train_seconds")
        params = ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in _values(trial).items())
        lines.append(f"| {trial.number} | {trial.state.name.lower()} | {value} | "
                     f"{'–' if seconds is None else f'{seconds:.0f}'} | {params} |")
    found = importances(study)
    if found:
        lines += ["", "Parameter importance: " + ", ".join(f"`{k}` {v:.2f}" for k, v in found.items()) + "."]
    return lines + [""]


def write(spec, studies: dict[str, Any], comparison: list[dict] | None = None) -> Path:
    """Write ``tune_report.md`` (+ PNGs under ``plots/``) and a self-contained ``tune_report.html``."""
    run_dir = spec.run_dir
    search = spec.search
    maximize = search.direction == "maximize"
    plots = {"tune_history": plot_history(studies, search.metric, maximize),
             "tune_curves": plot_curves(studies, maximize), "tune_importance": plot_importance(studies)}
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    for name, png in plots.items():
        if png is not None:
            (run_dir / "plots" / f"{name}.png").write_bytes(png)
    lines = [f"# Hyper-parameter search `{spec.name}`", "",
             f"Optuna TPE, median pruning on the eval loss; metric `{search.metric}` ({search.direction}). "
             "Search space: " + ", ".join(_space_text(k, v) for k, v in search.params.items()) + ". "
             "Trial 0 of each study is the spec's own configuration; `method.options` keys that a method "
             "lacks are skipped for it.", ""]
    if len(studies) > 1:
        lines += ["## Equal budget", "", "| method | trials | best " + search.metric + " | default |",
                  "|---|---:|---:|---:|"]
        for label, study in studies.items():
            best = study.best_trial.value if _complete(study) else None
            default = default_trial(study)
            lines.append(f"| {label} | {len(study.trials)} | {'–' if best is None else f'{best:.4f}'} | "
                         f"{'–' if default is None else f'{default.value:.4f}'} |")
        lines.append("")
    lines.append("## Studies\n")
    for label, study in studies.items():
        lines += _study_lines(label, study, search.metric)
    if comparison:
        lines += ["## Comparison at each method's best configuration\n",
                  f"See `{spec.output_dir}/{spec.name}-best/report.md` ({len(comparison)} cells).", ""]
    lines += ["## Plots", ""] + [f"![{n}](plots/{n}.png)\n" for n, png in plots.items() if png is not None]
    lines.append("The best configuration is in `best.yaml` (run it with `tunelab run`).\n")
    markdown = "\n".join(lines)
    atomic_write_text(run_dir / "tune_report.md", markdown)
    page = markdown_html.page(f"tunelab tune: {spec.name}", markdown_html.to_html(markdown, plots))
    atomic_write_text(run_dir / "tune_report.html", page)
    return run_dir / "tune_report.md"
