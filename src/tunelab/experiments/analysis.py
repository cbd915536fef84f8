"""The written analysis of a comparison, generated from the result rows (``report.summarize``).

For each training-set size:

- **Best per budget**: the Pareto frontier of quality against each cost (trainable parameters, peak
  memory, train time, and with ``report.price_per_hour`` the training cost, :mod:`pricing`). A point
  is on the frontier when no other method is at least as good for at most the same cost; walking the
  frontier from cheap to expensive answers "with a budget of X, use M".
- **Ties**: methods whose 95% confidence interval (Student's t over seeds, ``plots.ci95``) overlaps the
  best method's are *statistically tied* with it; the analysis says so instead of ranking them. With a
  single seed there is no interval, and the text says that no difference can be called significant.
- **Why**: each method named gets its math from its registry entry (``tuners.registry.get(name).notes``),
  so the explanation is the same text as ``tunelab methods`` and the Methods section.

Pareto plots (quality vs peak memory, vs train time, and vs training cost when priced) start their
quality axis at 0 (``plots.score_axis``).
``report_section`` returns the section for ``report.md`` / ``report.html`` (one call from
:func:`tunelab.experiments.report.write_report`).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from tunelab.experiments import markdown_html, pricing
from tunelab.experiments.plots import figure_png, legend_beside, point_colors, score_axis

COSTS = (("trainable_parameters", "trainable parameters", "{:,.0f}"),
         ("peak_memory_mb", "peak memory (MB, RSS)", "{:,.0f}"),
         ("train_seconds", "train time (s)", "{:,.0f}"))


def costs(rows: list[dict]) -> tuple[tuple[str, str, str], ...]:
    """``COSTS``, plus the training cost when the rows are priced (``report.price_per_hour``)."""
    return COSTS + pricing.frontier_costs(rows)


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def frontier(rows: list[dict], cost: str) -> list[dict]:
    """Rows on the quality/cost Pareto frontier, cheapest first (each one better than every cheaper one)."""
    usable = [r for r in rows if _finite(r.get(cost)) and _finite(r.get("score"))]
    usable.sort(key=lambda r: (r[cost], -r["score"]))
    front, best = [], -math.inf
    for row in usable:
        if row["score"] > best:
            front.append(row)
            best = row["score"]
    return front


def ties(rows: list[dict]) -> tuple[dict | None, list[dict]]:
    """The best row and the rows whose 95% CI overlaps it (empty without intervals)."""
    usable = [r for r in rows if _finite(r.get("score"))]
    if not usable:
        return None, []
    best = max(usable, key=lambda r: r["score"])
    if best["seeds"] < 2:
        return best, []
    low = best["score"] - best["score_ci95"]
    tied = [r for r in usable if r is not best and r["seeds"] >= 2 and r["score"] + r["score_ci95"] >= low]
    return best, tied


def task_set(row: dict) -> frozenset[str]:
    """The tasks a row's score covers (the prefixes of its ``task/metric`` keys; empty for one task)."""
    return frozenset(key.split("/", 1)[0] for key in row.get("metrics") or {} if "/" in key)


TEST_DATA_KEYS = ("source", "test_source", "format", "domain", "tasks")


def test_data(result: dict) -> tuple[tuple[str, str], ...]:
    """What a result was scored on besides its size: the data fields that choose the test set (``data.source``,
    ``test_source``, ``format``, ``domain``, ``tasks`` of the cell's config), as ``(key, text)`` pairs."""
    data = (result.get("config") or {}).get("data") or {}
    pairs = []
    for key in TEST_DATA_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        pairs.append((key, str(value)))
    return tuple(pairs)


def _scope(tasks: frozenset[str], data: tuple[tuple[str, str], ...], varying: set[str]) -> str:
    """The part of a group's test data that differs from other groups of its size, e.g. ``domain=legal``."""
    named_tasks = "metric tasks" in varying and "tasks" not in varying and tasks  # data.tasks says it better
    parts = [", ".join(sorted(tasks))] if named_tasks else []
    parts += [f"{key}={value}" for key, value in data if key in varying]
    return "; ".join(parts)


def comparable_groups(rows: list[dict]) -> list[tuple[int, str, list[dict]]]:
    """Rows that may be ranked against each other: the same training size, scored on the same tasks *and*
    the same test data (source, domain, ...: :func:`test_data`, stored in each row as ``test_data``).

    Single-task baselines of a multi-task study each score a different task, so one's NER F1 is not
    better than another's QA exact match; a cell scored on the legal domain is not better than one scored
    on the medical domain. Every ranking (best, ties, frontiers, recommendation) works inside one of
    these groups. Returns ``(train_size, scope, rows)`` sorted by size, then scope, where scope names
    what sets the group apart from the others of its size ("" when it is the only one)."""
    groups: dict[tuple[int, frozenset[str], tuple], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["train_size"], task_set(row), tuple(row.get("test_data") or ())), []).append(row)
    out = []
    for size in sorted({size for size, _, _ in groups}):
        keys = [key for key in groups if key[0] == size]
        varying: set[str] = set()
        if len({tasks for _, tasks, _ in keys}) > 1:
            varying.add("metric tasks")
        fields = [dict(data) for _, _, data in keys]
        for name in TEST_DATA_KEYS:
            if len({f.get(name) for f in fields}) > 1:
                varying.add(name)
        scoped = [(_scope(tasks, data, varying), groups[(size, tasks, data)]) for _, tasks, data in keys]
        out += [(size, scope, group) for scope, group in sorted(scoped, key=lambda item: item[0])]
    return out


def ranked_groups(rows: list[dict]) -> list[tuple[int, str, bool, list[dict]]]:
    """``(train_size, scope, split, rows)`` for each group worth ranking: the only group of its size, or
    one with >= 2 rows when its size is split over several test sets (``split``: say which, ``scope``)."""
    groups = comparable_groups(rows)
    per_size = Counter(size for size, _, _ in groups)
    return [(size, scope, per_size[size] > 1, group) for size, scope, group in groups
            if per_size[size] == 1 or len(group) >= 2]


def method_names(result: dict) -> str:
    """The registered method(s) behind a result: ``lora``, or ``lora+ia3`` for a combination."""
    return "+".join([result["method"], *result.get("combined_methods", [])])


def _method_notes(label: str, results_by_label: dict[str, str]) -> str:
    """The math of the method behind ``label`` (:func:`method_names`); each part's, for a combination."""
    from tunelab.tuners import registry

    names = results_by_label.get(label, label).split("+")
    notes = []
    for name in names:
        try:
            entry = registry.get(name)
        except Exception:  # a method no longer registered
            return ""
        notes.append(entry.notes or entry.summary)
    if len(names) == 1:
        return notes[0]
    return "trained jointly on one model: " + " + ".join(f"{name}: {note}" for name, note in zip(names, notes, strict=True))


def _score(row: dict) -> str:
    return f"{row['score']:.4f}" + (f" ± {row['score_ci95']:.4f}" if row["seeds"] > 1 else "")


def markdown_section(results: list[dict], rows: list[dict]) -> str:
    """``## Analysis``: best per budget, ties, and why, per training-set size."""
    if not rows:
        return ""
    method_of = {r["method_label"]: method_names(r) for r in results}
    lines = ["## Analysis", "",
             "Generated from the results above. *Best per budget* walks the Pareto frontier of held-out score "
             "against each cost: with at most that cost, that method scores best. *Tied* means the 95% "
             "confidence intervals over seeds overlap, so the data cannot rank those methods.", ""]
    named: set[str] = set()
    ranked = ranked_groups(rows)
    scope_of = {id(row): scope for _, scope, group in comparable_groups(rows) for row in group}
    for size in sorted({r["train_size"] for r in rows}):
        for n, scope, split, group in ranked:
            if n == size:
                scored_on = f", scored on {scope}" if split and scope else ""
                lines += _size_section(f"### {size} training examples{scored_on}", group, named)
        ranked_ids = {id(row) for n, _, _, group in ranked if n == size for row in group}
        alone = [f"{row['method']} ({scope_of.get(id(row)) or 'score'})"
                 for row in rows if row["train_size"] == size and id(row) not in ranked_ids]
        if alone:
            lines += [f"### {size} training examples: not ranked", "",
                      "Each of these cells is scored on other test data than every other cell (its test data in "
                      "parentheses), so their scores are not comparable: " + "; ".join(alone) + ".", ""]
    why = [(label, _method_notes(label, method_of)) for label in sorted(named)]
    why = [(label, note) for label, note in why if note]
    if why:
        lines += ["### Why, from each method's math", ""]
        lines += [f"- **{label}** — {note}" for label, note in why]
        lines.append("")
    lines += ["![quality vs peak memory](plots/pareto_memory.png)", "",
              "![quality vs train time](plots/pareto_time.png)", ""]
    if pricing.priced(rows):
        lines += [f"![quality vs training cost](plots/{pricing.PLOT_NAME}.png)", ""]
    return "\n".join(lines) + "\n"


def _size_section(heading: str, group: list[dict], named: set[str]) -> list[str]:
    """Best score, ties and best per budget among cells scored on the same test data."""
    best, tied = ties(group)
    if best is None:
        return []
    named.add(best["method"])
    lines = [heading, "",
             f"**Best score: {best['method']}** ({_score(best)}, {best['trainable_parameters']:,} trainable "
             f"parameters, {best['peak_memory_mb']:.0f} MB peak, {best['train_seconds']:.0f} s)."]
    if best["seeds"] < 2:
        lines.append("Single seed: no confidence intervals, so no difference here can be called significant; "
                     "add seeds (grid.seeds) before drawing conclusions.")
    elif tied:
        named.update(r["method"] for r in tied)
        lines.append("Statistically tied with it (overlapping 95% CIs): "
                     + ", ".join(f"{r['method']} ({_score(r)})" for r in tied) + ".")
    else:
        lines.append("Its 95% CI does not overlap any other method's: the lead is significant at this size.")
    if pricing.COST_KEY in best:
        lines.append(f"Its training cost: {pricing.money(best[pricing.COST_KEY])} units at {best['price_per_hour']:g} "
                     f"per device-hour, measured on {best['device']}.")
    lines.append("")
    for cost, label, fmt in costs(group):
        front = frontier(group, cost)
        if len(front) < 1:
            continue
        steps = "; ".join(f"≤ {fmt.format(r[cost])} → **{r['method']}** ({_score(r)})" for r in front)
        lines.append(f"- Budget in {label}: {steps}.")
        named.update(r["method"] for r in front)
    cheapest = min(group, key=lambda r: r["trainable_parameters"])
    if cheapest is not best and best["score"] > 0:
        lines.append(f"- {cheapest['method']} trains {cheapest['trainable_parameters']:,} parameters "
                     f"({best['trainable_parameters'] / max(cheapest['trainable_parameters'], 1):,.0f}x fewer "
                     f"than {best['method']}) and reaches {100 * cheapest['score'] / best['score']:.0f}% "
                     "of its score.")
    lines.append("")
    return lines


def plot_pareto(rows: list[dict], cost: str, label: str) -> bytes:
    """Score (with 95% CI bars) against a cost, one marker per method and size, frontier joined."""
    def draw(axis):
        colors = iter(point_colors(len(rows)))
        for size in sorted({r["train_size"] for r in rows}):
            group = [r for r in rows if r["train_size"] == size and _finite(r.get(cost))]
            for row in group:
                axis.errorbar(row[cost], row["score"], yerr=row["score_ci95"] or None, fmt="o", capsize=3,
                              color=next(colors), label=f"{row['method']} (n={size})")
            for _size, _scope, same in comparable_groups(group):  # a frontier only joins comparable cells
                front = frontier(same, cost)
                if len(front) > 1:
                    axis.plot([r[cost] for r in front], [r["score"] for r in front], color="grey", linewidth=1,
                              linestyle=":")
        values = [r[cost] for r in rows if _finite(r.get(cost)) and r[cost] > 0]
        if values and max(values) / min(values) > 20:
            from matplotlib.ticker import FuncFormatter, LogLocator

            axis.set_xscale("log")  # plain numbers at 1, 2 and 5 per decade (10^-1 notation labels overlap)
            axis.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            for which in ("major", "minor"):
                getattr(axis.xaxis, f"set_{which}_formatter")(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_xlabel(label)
        score_axis(axis, [r["score"] + (r["score_ci95"] or 0.0) for r in rows],
                   label="held-out score (mean ± 95% CI)")
        axis.set_title(f"Quality vs {label} (dotted: Pareto frontier)")
        legend_beside(axis)
        axis.grid(alpha=0.3)
    return figure_png(draw, width=8.5)  # room for the legend beside the axes


def report_section(run_dir: str | Path, results: list[dict], rows: list[dict]) -> tuple[str, str]:
    """The analysis as ``(markdown, html block)`` for the report, with its Pareto plots written to
    ``run_dir/plots``; ``("", "")`` when there is nothing to analyse."""
    run_dir = Path(run_dir)
    section = markdown_section(results, rows)
    if not section:
        return "", ""
    pngs = {"pareto_memory": plot_pareto(rows, "peak_memory_mb", "peak memory (MB, RSS)"),
            "pareto_time": plot_pareto(rows, "train_seconds", "train time (s)")}
    (run_dir / "plots").mkdir(exist_ok=True)
    if pricing.priced(rows):
        pngs[pricing.PLOT_NAME] = plot_pareto(rows, pricing.COST_KEY, pricing.cost_label(rows))
    else:  # a plot of an earlier, priced build would no longer match the report
        (run_dir / "plots" / f"{pricing.PLOT_NAME}.png").unlink(missing_ok=True)
    for name, png in pngs.items():
        (run_dir / "plots" / f"{name}.png").write_bytes(png)
    return section, f'<section id="analysis">{markdown_html.to_html(section, pngs)}</section>'
