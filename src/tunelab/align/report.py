"""The alignment section of a report: held-out reward against KL to the reference, and its frontier.

Built only from result files. Every cell whose aligned stage (objective ``dpo``, ``kto``, ``ppo`` or
``grpo``; the experiment itself when it has no stages) was evaluated with a reference carries
``kl_ref`` (:mod:`tunelab.align.kl`: the mean over held-out prompts of Σ_t KL(π ‖ π_ref) along one
completion sampled from the policy, nats) next to a reward-like held-out score:

    dpo / kto    generation_exact_match   greedy output = the known answer (``eval_generation``)
    ppo / grpo   exact_match              the same greedy exact match (``reward: exact_match``)
    ppo / grpo   reward                   the trained reward model's mean score (``reward: model``)

The two exact matches are the same measurement (greedy decoding, first line, SQuAD-normalised, against
the record's known answer), so DPO's β and PPO's β_KL cells land on one plot. A reward model's score
has another scale: it gets a panel of its own. Cells sharing a label are averaged over seeds (mean ±
95% CI, Student's t, on both axes). The **frontier** (per aligned stage and reward) keeps the points
that reach a higher reward than every point with less KL: "with at most this much drift from the
reference, this cell's setting gets the most reward". Several aligned stages in one cell (SFT → DPO →
GRPO) give one point each, and a stage's KL is to *its own* reference (the model it started from with
``reference: sft_adapter``), so frontiers join points of the same stage only.

:func:`markdown_section` is the section's markdown (empty when no cell has both numbers);
:func:`plots` returns ``{"alignment_frontier": png}`` for the figure it links to.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from tunelab.experiments.plots import ci95, figure_png, score_axis

ALIGNED = ("dpo", "kto", "ppo", "grpo")
KL_KEY = "kl_ref"
# metric key -> the reward it measures (keys with the same name are one axis)
REWARDS = {"generation_exact_match": "exact match", "exact_match": "exact match", "reward": "reward-model score"}
# objective -> (option holding its KL coefficient, symbol)
COEFFICIENTS = {"dpo": ("beta", "β"), "kto": ("beta", "β"), "grpo": ("beta", "β"), "ppo": ("init_kl_coef", "β_KL")}
PLOT = "alignment_frontier"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _default(objective: str, option: str):
    from tunelab.align import DPOOptions, GRPOOptions, KTOOptions, PPOOptions

    options = {"dpo": DPOOptions, "kto": KTOOptions, "grpo": GRPOOptions, "ppo": PPOOptions}[objective]
    return options.model_fields[option].default


def aligned_stages(result: dict) -> list[tuple[str, str, dict, dict]]:
    """``(stage name, objective, objective options, that stage's held-out metrics)`` of each aligned stage."""
    config = result.get("config") or {}
    base = config.get("objective") or {}
    stages = result.get("stages")
    if not stages:
        if result.get("objective") not in ALIGNED:
            return []
        return [("main", result["objective"], base.get("options") or {}, result.get("metrics") or {})]
    specs = config.get("stages") or []
    out = []
    for index, stage in enumerate(stages):
        if stage.get("objective") not in ALIGNED:
            continue
        spec = (specs[index].get("objective") if index < len(specs) else None) or base
        options = spec.get("options") or {} if spec.get("name", stage["objective"]) == stage["objective"] else {}
        out.append((stage["name"], stage["objective"], options, stage.get("metrics") or {}))
    return out


def coefficient(objective: str, options: dict) -> tuple[str, float | None, str]:
    """``(symbol, value, text)`` of the stage's KL coefficient: β of dpo / kto / grpo, PPO's β_KL."""
    option, symbol = COEFFICIENTS[objective]
    value = options.get(option, _default(objective, option))
    text = f"{symbol} = {value:g}" if _finite(value) else f"{symbol} = {value}"
    if objective == "ppo":
        target = options.get("target_kl", _default("ppo", "target_kl"))
        text += " (fixed)" if target is None else f" (initial; adaptive, target KL {target:g})"
    return symbol, value if _finite(value) else None, text


def _objective_name(objective: str, options: dict) -> str:
    loss = options.get("loss_type")
    return f"{objective} ({loss})" if objective == "dpo" and loss and loss != "sigmoid" else objective


def points(results: list[dict]) -> list[dict]:
    """One point per (cell label, training size, aligned stage, reward), averaged over seeds."""
    groups: dict[tuple, list[tuple[dict, str, str, dict, dict, str]]] = defaultdict(list)
    for result in results:
        stages = aligned_stages(result)
        for stage, objective, options, metrics in stages:
            key = next((k for k in REWARDS if _finite(metrics.get(k))), None)
            if key is None or not _finite(metrics.get(KL_KEY)):
                continue
            label = result["method_label"] if len(stages) == 1 else f"{result['method_label']} / {stage}"
            groups[(label, result.get("train_size"), stage, REWARDS[key])].append(
                (result, objective, stage, options, metrics, key))
    out = []
    for (label, size, stage, kind), members in groups.items():
        _, objective, _, options, _, key = members[0]
        rewards = [m[4][m[5]] for m in members]
        kls = [m[4][KL_KEY] for m in members]
        symbol, value, text = coefficient(objective, options)
        name = _objective_name(objective, options)
        out.append({"label": label, "train_size": size, "stage": stage, "objective": name, "kind": kind,
                    "metric": key, "coefficient": value, "coefficient_text": text,
                    "short": f"{name.replace(' (', ' ').rstrip(')')} {symbol}={value:g}" if value is not None else name,
                    "reward": statistics.fmean(rewards), "reward_ci95": ci95(rewards),
                    "kl": statistics.fmean(kls), "kl_ci95": ci95(kls), "seeds": len(members)})
    out.sort(key=lambda p: (p["kind"], p["stage"], p["kl"], -p["reward"]))
    return out


def frontier(group: list[dict]) -> list[dict]:
    """The points with more reward than every point of less (or equal) KL, lowest KL first."""
    front, best = [], -math.inf
    for point in sorted(group, key=lambda p: (p["kl"], -p["reward"])):
        if point["reward"] > best:
            front.append(point)
            best = point["reward"]
    return front


def _panels(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """``{reward kind: {stage: points}}``: one panel per reward, one frontier per stage in it."""
    panels: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for point in rows:
        panels[point["kind"]][point["stage"]].append(point)
    return panels


def _value(mean: float, ci: float, seeds: int) -> str:
    return f"{mean:.4f}" + (f" ± {ci:.4f}" if seeds > 1 else "")


def markdown_section(results: list[dict]) -> str:
    """``## Reward vs KL to the reference``: the table, the frontier in words, the plot; "" without points."""
    rows = points(results)
    if not rows:
        return ""
    on_front = {id(p) for stages in _panels(rows).values() for group in stages.values() for p in frontier(group)}
    lines = ["## Reward vs KL to the reference", "",
             "One point per cell's aligned stage. KL = `kl_ref`: the mean over held-out prompts of Σ_t KL(π ‖ π_ref) "
             "along one completion sampled from the policy at temperature 1 — an unbiased estimate of the "
             "sequence-level KL(π ‖ π_ref), in nats (docs/align.md). Reward = greedy exact match with the known "
             "answer on the same held-out prompts (dpo / kto: `generation_exact_match`, ppo / grpo: "
             "`exact_match`), or a reward model's mean score. With several seeds, mean ± 95% CI. *Frontier*: "
             "the cells that reach more reward than every cell with less KL.", "",
             "| cell | stage | objective | KL coefficient | reward | metric | KL to reference (nats) | seeds "
             "| frontier |", "|---|---|---|---|---:|---|---:|---:|---|"]
    for p in rows:
        lines.append(f"| {p['label']} | {p['stage']} | {p['objective']} | {p['coefficient_text']} | "
                     f"{_value(p['reward'], p['reward_ci95'], p['seeds'])} | {p['metric']} | "
                     f"{_value(p['kl'], p['kl_ci95'], p['seeds'])} | {p['seeds']} | "
                     f"{'yes' if id(p) in on_front else ''} |")
    lines.append("")
    for kind, stages in _panels(rows).items():
        for stage, group in stages.items():
            steps = "; ".join(f"KL ≤ {p['kl']:.3g} → **{p['short']}** ({p['reward']:.4f})" for p in frontier(group))
            lines.append(f"- Frontier ({kind}, stage {stage}): {steps}.")
    if len({p["stage"] for p in rows}) > 1:
        lines.append("- Each stage's KL is to its own reference (the model that stage started from), so "
                     "frontiers join points of one stage only.")
    lines += ["", f"![reward vs KL](plots/{PLOT}.png)", ""]
    return "\n".join(lines) + "\n"


MARKERS = "os^Dv<>P"


def plot(rows: list[dict]) -> bytes:
    """Reward (y) against KL to the reference (x), one point per cell, 95% CI bars, frontier joined."""
    panels = _panels(rows)
    objectives = sorted({p["objective"] for p in rows})
    colours = {name: f"C{i % 10}" for i, name in enumerate(objectives)}

    def draw(figure):
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        for axis, (kind, stages) in zip(axes, panels.items(), strict=True):
            for s, (stage, group) in enumerate(stages.items()):
                marker = MARKERS[s % len(MARKERS)]
                for i, p in enumerate(group):  # sorted by KL: neighbours' labels are staggered, not stacked
                    axis.errorbar(p["kl"], p["reward"], xerr=p["kl_ci95"] or None, yerr=p["reward_ci95"] or None,
                                  fmt=marker, color=colours[p["objective"]], capsize=3)
                    axis.annotate(p["short"], (p["kl"], p["reward"]), textcoords="offset points",
                                  xytext=(4, 4 + 10 * (i % 3)), fontsize=7)
                front = frontier(group)
                axis.plot([p["kl"] for p in front], [p["reward"] for p in front], color="grey", linewidth=1,
                          linestyle=":", label=f"frontier{f' ({stage})' if len(stages) > 1 else ''}")
            for name in objectives:
                if any(p["objective"] == name for group in stages.values() for p in group):
                    axis.plot([], [], "o", color=colours[name], label=name)
            group_points = [p for group in stages.values() for p in group]
            low = min([0.0] + [p["kl"] - p["kl_ci95"] for p in group_points])
            high = max(p["kl"] + p["kl_ci95"] for p in group_points)
            positive = [p["kl"] for p in group_points if p["kl"] > 0]
            wide = bool(positive) and max(positive) / min(positive) > 20  # e.g. DPO β 1 at ~1 nat, β 0.03 at ~50
            if wide:  # logarithmic past a linear stretch near 0 (KL estimates can be 0 or slightly negative)
                axis.set_xscale("symlog", linthresh=min(positive) / 2)
            axis.set_xlim(low, high * (2.0 if wide else 1.15) if high > 0 else 1.0)
            axis.set_xlabel("KL(π ‖ π_ref) on held-out prompts, policy samples (nats / sequence)"
                            + (", symlog scale" if wide else ""))
            if kind == "exact match":
                score_axis(axis, [p["reward"] + p["reward_ci95"] for p in group_points],
                           label="held-out greedy exact match")
            else:
                axis.set_ylabel(f"held-out {kind}")
            axis.set_title(f"{kind.capitalize()} vs KL to the reference (dotted: frontier)", fontsize=9)
            axis.legend(fontsize=7)
            axis.grid(alpha=0.3)
        figure.tight_layout()

    return figure_png(draw, width=6.4 * len(panels), height=4.2, figure_level=True)


def plots(results: list[dict]) -> dict[str, bytes]:
    """``{"alignment_frontier": PNG}`` when the results have points, else ``{}``."""
    rows = points(results)
    return {PLOT: plot(rows)} if rows else {}


__all__ = ["aligned_stages", "coefficient", "frontier", "markdown_section", "plot", "plots", "points"]
