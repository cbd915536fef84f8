"""The distillation section of a report: teacher vs students — size, speed, score, retention.

Built only from result files. Cells whose objective distils (``distill``, ``distill_classification``)
carry the teacher's held-out score and a side-by-side timing of teacher and student (same batch, same
process, alternating rounds; see ``passes.size_and_speed``); other cells (the labels-only baseline:
objective ``sft`` or ``classification``) contribute their own score, parameters and the runner's
forward latency. A labels-only cell as large as the teacher (the teacher trained alone, a reference)
is listed but is not the baseline that the students' gains are measured against.

    retention = student score / teacher score          speed-up = teacher latency / student latency
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from tunelab.experiments.plots import ci95, figure_png, score_axis

PLOT = "distillation"

DISTILL_OBJECTIVES = ("distill", "distill_classification")


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _format(value: float | None, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def rows(results: list[dict]) -> tuple[dict | None, list[dict]]:
    """``(teacher row, student rows)``; student rows are grouped by method label (mean over seeds)."""
    distilled = [r for r in results if "teacher_score" in r.get("metrics", {})]
    if not distilled:
        return None, []
    largest = max(r["metrics"].get("teacher_parameters", 0) for r in distilled)  # the main teacher, not a snapshot
    distilled = [r for r in distilled if r["metrics"].get("teacher_parameters", 0) == largest]
    metrics = [r["metrics"] for r in distilled]
    teacher = {"label": "teacher", "score": _mean([m["teacher_score"] for m in metrics]),
               "parameters": _mean([m.get("teacher_parameters") for m in metrics]),
               "weights_mb": _mean([m.get("teacher_weights_mb") for m in metrics]),
               "latency_ms": _mean([m.get("teacher_latency_ms") for m in metrics]),
               "tokens_per_s": _mean([m.get("teacher_tokens_per_s") for m in metrics])}
    groups: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        groups[result["method_label"]].append(result)
    students = []
    for label, group in groups.items():
        scores = [r["metrics"].get("score", float("nan")) for r in group]
        paired = [r["metrics"] for r in group if "student_latency_ms" in r["metrics"]]
        row = {"label": label, "objective": group[0].get("objective", "?"), "seeds": len(group),
               "score": statistics.fmean(scores), "ci95": ci95(scores),
               "parameters": group[0].get("total_parameters"),
               "weights_mb": _mean([m.get("student_weights_mb") for m in paired])
               or (group[0].get("total_parameters") or 0) * 4 / 2**20,
               "latency_ms": _mean([m.get("student_latency_ms") for m in paired])
               or _mean([r.get("inference_latency_ms") for r in group]),
               "speedup": _mean([m.get("speedup") for m in paired])}
        if row["speedup"] is None and row["latency_ms"] and teacher["latency_ms"]:
            row["speedup"] = teacher["latency_ms"] / row["latency_ms"]  # across processes: indicative only
        row["tokens_per_s"] = _mean([m.get("student_tokens_per_s") for m in paired])
        row["retention"] = row["score"] / teacher["score"] if teacher["score"] else None
        students.append(row)
    students.sort(key=lambda row: -row["score"])
    return teacher, students


def markdown_section(results: list[dict]) -> str:
    """``## Distillation`` with the teacher and every student; empty when no cell distilled."""
    teacher, students = rows(results)
    if teacher is None:
        return ""
    baselines = [row for row in students if row["objective"] not in DISTILL_OBJECTIVES
                 and not (row["parameters"] and teacher["parameters"] and row["parameters"] >= teacher["parameters"])]
    baseline = max(baselines, key=lambda row: row["score"]) if baselines else None
    by_size = {}  # a student's own baseline: the labels-only cell of its size (a smaller cut student has one)
    for row in sorted(baselines, key=lambda row: row["score"]):
        by_size[row["parameters"]] = row
    lines = ["## Distillation: teacher vs students", "",
             "Retention = student score / teacher score (held-out test data). Latency: one forward pass over 8 "
             "test examples, median; for distilled cells timed beside the teacher in the same process "
             "(speed-up = teacher / student latency), for other cells the runner's own timing. "
             + (f"Baseline: **{baseline['label']}** (objective `{baseline['objective']}`, labels only)"
                + (", or the labels-only cell of the student's own size ("
                   + ", ".join(f"{r['label']}: {r['parameters']:,}" for r in by_size.values()) + " parameters)"
                   if len(by_size) > 1 else "")
                + "; ± = 95% CI of the difference, √(CI₁² + CI₂²) over seeds."
                if baseline else "No labels-only baseline in this run."), "",
             "| model | objective | seeds | score | retention | vs baseline | parameters | weights MB | latency ms "
             "| tokens/s | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| teacher | – | – | {_format(teacher['score'], '.4f')} | 100.0% | – | "
             f"{_format(teacher['parameters'], ',.0f')} | {_format(teacher['weights_mb'], '.1f')} | "
             f"{_format(teacher['latency_ms'], '.2f')} | {_format(teacher['tokens_per_s'], ',.0f')} | 1.00 |"]
    for row in students:
        score = f"{row['score']:.4f}" + (f" ± {row['ci95']:.4f}" if row["seeds"] > 1 else "")
        retention = "–" if row["retention"] is None else f"{100 * row['retention']:.1f}%"
        own = by_size.get(row["parameters"], baseline)
        delta = "–"
        if own is not None and row is not own and row not in by_size.values():
            delta = f"{row['score'] - own['score']:+.4f}"
            if row["seeds"] > 1 and own["seeds"] > 1:
                delta += f" ± {(row['ci95'] ** 2 + own['ci95'] ** 2) ** 0.5:.4f}"
        lines.append(f"| {row['label']} | {row['objective']} | {row['seeds']} | {score} | {retention} | {delta} | "
                     f"{_format(row['parameters'], ',.0f')} | {_format(row['weights_mb'], '.1f')} | "
                     f"{_format(row['latency_ms'], '.2f')} | {_format(row['tokens_per_s'], ',.0f')} | "
                     f"{_format(row['speedup'], '.2f')} |")
    lines_text = "\n".join(lines) + "\n\n"
    return lines_text + f"![teacher vs students](plots/{PLOT}.png)\n\n"


def plot(results: list[dict]) -> bytes | None:
    """Held-out score (95% CI bars) against parameters: the teacher as a star, each student a point, the
    labels-only cells hollow; the grey lines mark 100% and 95% of the teacher's score."""
    teacher, students = rows(results)
    if teacher is None or not students:
        return None

    def draw(axis):
        placed: dict = defaultdict(int)  # labels at one size are staggered, not stacked
        for row in sorted(students, key=lambda r: -r["score"]):
            hollow = row["objective"] not in DISTILL_OBJECTIVES
            axis.errorbar(row["parameters"], row["score"], yerr=row["ci95"] if row["seeds"] > 1 else None,
                          fmt="o", capsize=3, color="C1" if hollow else "C0",
                          markerfacecolor="none" if hollow else None)
            axis.annotate(row["label"], (row["parameters"], row["score"]), textcoords="offset points",
                          xytext=(6 + 70 * (placed[row["parameters"]] % 2), 0), fontsize=7, va="center")
            placed[row["parameters"]] += 1
        axis.plot([teacher["parameters"]], [teacher["score"]], "*", markersize=14, color="C3", label="teacher")
        axis.axhline(teacher["score"], color="grey", linewidth=1, linestyle=":")
        axis.axhline(0.95 * teacher["score"], color="grey", linewidth=1, linestyle="--",
                     label="95% of the teacher")
        axis.plot([], [], "o", color="C0", label="distilled")
        axis.plot([], [], "o", color="C1", markerfacecolor="none", label="labels only")
        axis.set_xscale("log")
        axis.set_xlabel("parameters (log)")
        score_axis(axis, [teacher["score"], *(r["score"] + r["ci95"] for r in students)])
        axis.set_title("Teacher vs students: held-out score against size", fontsize=9)
        axis.legend(fontsize=7, loc="lower right")
        axis.grid(alpha=0.3)

    return figure_png(draw, width=7.0, height=4.4)


def plots(results: list[dict]) -> dict[str, bytes]:
    """``{"distillation": PNG}`` when the results hold distilled cells, else ``{}``."""
    png = plot(results)
    return {PLOT: png} if png is not None else {}
