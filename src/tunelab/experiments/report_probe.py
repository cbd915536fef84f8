"""Report section: forgetting, measured by the general-ability probe (``eval.general_probe``).

Each result with a ``general_probe`` block (:mod:`tunelab.eval.probe`) gives the perplexity of the
untuned base (*before*) and of the tuned model (*after*, adapters active) on the same held-out
general-domain text, and ``Δ = after / before − 1``. Cells sharing a method label and a training size
are aggregated over seeds (mean ± the 95% CI half-width, Student's t, as the results table); staged
runs also get the perplexity after each stage. Cells whose model has no next-token perplexity (encoders)
are listed with the reason they were skipped.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from tunelab.experiments.plots import ci95


def _groups(results: list[dict]) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for result in results:
        probe = result.get("general_probe") or {}
        if probe.get("ppl_after") is not None and probe.get("ppl_before") is not None:
            groups[(result["method_label"], result["train_size"])].append(result)
    return dict(sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])))


def _mean_ci(values: list[float], scale: float = 1.0, digits: int = 3, signed: bool = False, unit: str = "") -> str:
    """``mean`` or ``mean ± CI half-width`` (several values), both times ``scale`` and followed by ``unit``."""
    mean = statistics.fmean(values) * scale
    text = (f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}") + unit
    return text + (f" ± {ci95(values) * scale:.{digits}f}{unit}" if len(values) > 1 else "")


def mean_change_by_label(results: list[dict]) -> dict[str, float]:
    """``{method label: mean Δ over its cells}`` (the continual-learning table's column)."""
    changes: dict[str, list[float]] = defaultdict(list)
    for result in results:
        change = (result.get("general_probe") or {}).get("change")
        if change is not None:
            changes[result["method_label"]].append(change)
    return {label: statistics.fmean(values) for label, values in changes.items()}


def markdown_section(results: list[dict]) -> str:
    """``## Forgetting: general held-out perplexity``; empty when no result ran the probe."""
    groups = _groups(results)
    skipped = [r for r in results if (r.get("general_probe") or {}).get("skipped")]
    if not groups and not skipped:
        return ""
    lines = ["## Forgetting: general held-out perplexity", ""]
    if groups:
        first = next(iter(groups.values()))[0]["general_probe"]
        lines += [f"Perplexity on {first['documents']} held-out general-domain documents ({first['tokens']:,} tokens, "
                  f"source: {first['source']}) of the untuned base (before) and of each cell's final model, "
                  "adapters active (after); Δ = after / before − 1, so a positive Δ is forgetting of general "
                  "text. With several seeds: mean ± 95% CI.", "",
                  "| method | train size | seeds | before | after | Δ |", "|---|---:|---:|---:|---:|---:|"]
        for (label, size), group in groups.items():
            before = [r["general_probe"]["ppl_before"] for r in group]
            after = [r["general_probe"]["ppl_after"] for r in group]
            change = [r["general_probe"]["change"] for r in group]
            lines.append(f"| {label} | {size} | {len(group)} | {statistics.fmean(before):.3f} | {_mean_ci(after)} | "
                         f"{_mean_ci(change, 100.0, 2, signed=True, unit='%')} |")
        lines.append("")
        lines += _stage_table(groups)
    for result in skipped:
        lines.append(f"- {result['run_id']}: probe skipped ({result['general_probe']['skipped']})")
    if skipped:
        lines.append("")
    return "\n".join(lines) + "\n"


def _stage_table(groups: dict[tuple[str, int], list[dict]]) -> list[str]:
    """General perplexity after each stage (mean over seeds), for staged runs with one stage list."""
    rows, names = [], None
    for (label, size), group in groups.items():
        stages = [r["general_probe"].get("stages") or [] for r in group]
        if len(stages[0]) < 2 or any([s["name"] for s in st] != [s["name"] for s in stages[0]] for st in stages):
            continue
        stage_names = [s["name"] for s in stages[0]]
        if names is not None and stage_names != names:
            continue  # another stage list: its own table would be needed; the final Δ is above
        names = stage_names
        means = [statistics.fmean(st[i]["ppl"] for st in stages) for i in range(len(names))]
        before = statistics.fmean(r["general_probe"]["ppl_before"] for r in group)
        rows.append(f"| {label} | {size} | {before:.3f} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    if not rows:
        return []
    return ["General perplexity after each stage (mean over seeds):", "",
            "| method | train size | before | " + " | ".join(f"after {n}" for n in names) + " |",
            "|---|---:|---:|" + "---:|" * len(names), *rows, ""]
