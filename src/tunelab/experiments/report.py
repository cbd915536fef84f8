"""Reports built only from the result files: ``report.md`` and a self-contained ``report.html``.

``tunelab report runs/<name>`` rebuilds them at any time. Cells that share a method label are
aggregated over seeds (mean ± the half-width of the 95% confidence interval, Student's t); plots are
embedded as base64 PNG so the HTML is one file; quality axes start at 0. Each method used gets a short
explanation of its math. Staged experiments get the cross-evaluation matrix (:mod:`report_stages`);
alignment cells with a held-out KL to their reference get the reward-vs-KL frontier
(:mod:`tunelab.align.report`); runs with ``eval.general_probe`` a forgetting section (:mod:`report_probe`).
Cells that failed (``failed/<run>.json``, see :mod:`tunelab.experiments.jobs`) are listed in a section
of their own.
"""

from __future__ import annotations

import html
import json
import statistics
from collections import defaultdict
from pathlib import Path

from tunelab.align import curves as align_curves
from tunelab.align import report as align_report
from tunelab.distill import report as distill_report
from tunelab.errors import DataError
from tunelab.experiments import (
    analysis,
    markdown_html,
    pricing,
    report_baselines,
    report_efficiency,
    report_probe,
    report_stages,
    rundir,
)
from tunelab.experiments.plots import ci95, figure_png, legend_beside, mean_or_none, point_colors, score_axis
from tunelab.multitask import report as multitask_report
from tunelab.utils import atomic_write_text

REQUIRED_FIELDS = ("run_id", "method", "method_label", "model", "objective", "train_size", "metrics",
                   "trainable_parameters", "trainable_percent", "train_seconds", "train_tokens_per_second",
                   "peak_memory_mb", "history")


def _method_notes(name: str) -> str:
    """The method's math in two lines, from its registry entry (one source with ``tunelab methods``)."""
    from tunelab.tuners import registry

    try:
        spec = registry.get(name)
    except Exception:  # a result from a method no longer registered
        return f"see docs/methods/{name}.md"
    return spec.notes or spec.summary


def load_results(run_dir: str | Path) -> list[dict]:
    results_dir = Path(run_dir) / "results"
    if not results_dir.is_dir():
        raise DataError(f"no results in {run_dir} (expected {results_dir}/*.json); run `tunelab run` first")
    results = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"result file {path} is not valid JSON; delete it and rerun the experiment") from None
        missing = [key for key in REQUIRED_FIELDS if not isinstance(result, dict) or key not in result]
        if missing or not isinstance(result.get("metrics"), dict):
            raise DataError(f"result file {path} lacks {', '.join(missing) or 'a metrics mapping'}; it was not "
                            "written by `tunelab run` (move it away or rerun the experiment)")
        results.append(result)
    if not results:
        raise DataError(f"no result files in {results_dir}; run `tunelab run` first")
    return results


def summarize(results: list[dict], price_per_hour: float | None = None) -> list[dict]:
    """One row per (method label, train size): mean and std of score over seeds, and costs (with a price per
    device-hour also the money cost, :mod:`tunelab.experiments.pricing`)."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for result in results:
        groups[(result["method_label"], result["train_size"])].append(result)
    rows = []
    for (label, size), group in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        scores = [r["metrics"].get("score", float("nan")) for r in group]
        rows.append({
            "method": label, "train_size": size, "seeds": len(group),
            "score": statistics.fmean(scores), "score_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "score_ci95": ci95(scores),
            "trainable_parameters": group[0]["trainable_parameters"],
            "trainable_percent": group[0]["trainable_percent"],
            "train_seconds": statistics.fmean(r["train_seconds"] for r in group),
            "tokens_per_second": statistics.fmean(r["train_tokens_per_second"] or 0.0 for r in group),
            "peak_memory_mb": max(r["peak_memory_mb"] or 0.0 for r in group),
            "latency_ms": mean_or_none([r.get("inference_latency_ms") for r in group]),
            "metrics": {key: statistics.fmean(r["metrics"][key] for r in group)
                        for key in group[0]["metrics"] if all(key in r["metrics"] for r in group)},
            "test_data": analysis.test_data(group[0]),  # rows are ranked only against the same test data
            **pricing.row_fields(group, price_per_hour),
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    extra = pricing.columns(rows)  # cost columns, with a price per device-hour
    lines = ["| method | train size | seeds | score | trainable params | % of model | train s | tokens/s "
             "| peak RSS MB | latency ms |" + "".join(f" {h} |" for h, _ in extra),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(extra) - 1) + "---|" * bool(extra)]
    for row in rows:
        score = f"{row['score']:.4f}" + (f" ± {row['score_ci95']:.4f}" if row["seeds"] > 1 else "")
        latency = f"{row['latency_ms']:.1f}" if row["latency_ms"] is not None else "–"
        lines.append(f"| {row['method']} | {row['train_size']} | {row['seeds']} | {score} | "
                     f"{row['trainable_parameters']:,} | {row['trainable_percent']:.2f} | {row['train_seconds']:.0f} | "
                     f"{row['tokens_per_second']:.0f} | {row['peak_memory_mb']:.0f} | {latency} |"
                     + "".join(f" {cell(row)} |" for _, cell in extra))
    return "\n".join(lines) + (f"\n\n{pricing.note(rows)}" if extra else "")


def _metric_table(rows: list[dict]) -> str:
    keys = sorted({key for row in rows for key in row["metrics"]})
    lines = ["| method | train size | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for row in rows:
        values = " | ".join(f"{row['metrics'][k]:.4f}" if k in row["metrics"] else "–" for k in keys)
        lines.append(f"| {row['method']} | {row['train_size']} | {values} |")
    return "\n".join(lines)


def plot_loss_curves(results: list[dict]) -> bytes:
    def draw(axis):
        for result in results:
            points = [(h["step"], h["loss"]) for h in result["history"] if h.get("loss") is not None]
            if points:
                axis.plot(*zip(*points, strict=True), label=result["run_id"], linewidth=1.2)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.set_yscale("log")
        axis.set_title("Training loss")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    return figure_png(draw)


def plot_quality_vs_parameters(rows: list[dict]) -> bytes:
    def draw(axis):
        for row, color in zip(rows, point_colors(len(rows)), strict=True):
            axis.errorbar(row["trainable_parameters"], row["score"], yerr=row.get("score_ci95") or None, fmt="o",
                          capsize=3, color=color, label=f"{row['method']} (n={row['train_size']}, {row['seeds']} seed(s))")
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters (log scale)")
        score_axis(axis, [r["score"] + (r.get("score_ci95") or 0.0) for r in rows],
                   label="held-out score (mean of each task's main metric)")
        axis.set_title("Quality vs trainable parameters (error bars: 95% CI over seeds)")
        legend_beside(axis)
        axis.grid(alpha=0.3)
    return figure_png(draw, width=8.5)  # room for the legend beside the axes


def write_report(run_dir: str | Path, price_per_hour: float | None = None) -> tuple[Path, Path]:
    """Rebuild ``report.md`` (+ PNG plots) and a self-contained ``report.html`` from the result files.

    ``price_per_hour`` (units per device-hour) prices each cell's training; default: the run's
    ``config.yaml`` (``report.price_per_hour``), and no cost when it has none."""
    run_dir = Path(run_dir)
    price = pricing.price_per_hour(run_dir, price_per_hour)
    failed = rundir.failures(run_dir)
    if failed and not any((run_dir / "results").glob("*.json")):
        return _write_failures_only(run_dir, failed)
    results = load_results(run_dir)
    rows = summarize(results, price)
    name = rundir.experiment_name(run_dir, results)
    loss_png, quality_png = plot_loss_curves(results), plot_quality_vs_parameters(rows)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    (plots / "loss_curves.png").write_bytes(loss_png)
    (plots / "quality_vs_parameters.png").write_bytes(quality_png)
    methods = sorted({name for r in results for name in [r["method"], *r.get("combined_methods", [])]})
    notes = "\n".join(f"- **{m}** — {_method_notes(m)}" for m in methods)
    matrices = report_stages.stage_matrices(results)
    stage_png = report_stages.plot_stage_matrices(matrices)
    stage_md = report_stages.markdown_section(matrices) + report_stages.adapt_section(results, matrices)
    stage_md += distill_report.markdown_section(results)  # teacher vs students (tunelab.distill)
    stage_md += report_baselines.markdown_section(results)  # untuned / majority baselines, flags, samples
    stage_md += report_probe.markdown_section(results)  # forgetting: general held-out perplexity before/after
    stage_md += report_efficiency.markdown_section(results)  # memory mean/p99/max, merged latency, adapter size
    stage_md += multitask_report.markdown_section(results)  # single vs multi-task per task, Δp (tunelab.multitask)
    if stage_png is not None:
        stage_md += "![stage matrix](plots/stage_matrix.png)\n\n"
    stage_md += align_report.markdown_section(results)  # reward vs KL to the reference, frontier (tunelab.align)
    stage_md += align_curves.markdown_section(results)  # reward margin, accuracy and KL over training
    section_pngs = {"stage_matrix": stage_png, **multitask_report.plots(results),  # what stage_md links to
                    **align_report.plots(results), **align_curves.plots(results), **distill_report.plots(results)}
    for plot_name, png in section_pngs.items():
        if png is not None:
            (plots / f"{plot_name}.png").write_bytes(png)
    analysis_md, analysis_html = analysis.report_section(run_dir, results, rows)  # written analysis + Pareto plots
    first = results[0]
    markdown = (
        f"# Experiment `{name}`\n\n"
        f"Model `{first['model']}`, objective `{first['objective']}`, {len(results)} run(s)"
        f"{f', {len(failed)} failed (see Failed cells)' if failed else ''}. Score = the task's "
        "main held-out metric (see docs/evaluation.md); with several seeds, mean ± 95% confidence interval. "
        "Peak RSS is the run's process maximum.\n\n"
        f"## Results\n\n{markdown_table(rows)}\n\n{failed_markdown(failed)}## All metrics\n\n{_metric_table(rows)}\n\n{stage_md}"
        "## Plots\n\n![loss curves](plots/loss_curves.png)\n\n![quality vs parameters](plots/quality_vs_parameters.png)\n\n"
        f"{analysis_md}## Methods\n\n{notes}\n\n## Environment\n\n`{json.dumps(first.get('versions', {}))}`, git "
        f"`{first.get('git_sha') or 'n/a'}`\n"
    )
    atomic_write_text(run_dir / "report.md", markdown)
    html_text = _html(name, rows, results, notes, loss_png, quality_png, stage_md, section_pngs, failed)
    atomic_write_text(run_dir / "report.html", html_text.replace("<h2>Methods</h2>", analysis_html + "<h2>Methods</h2>", 1))
    return run_dir / "report.md", run_dir / "report.html"


FAILED_NOTE = "These cells stopped with an error and have no result; rerunning the same command retries them."


def failed_markdown(failed: list[dict]) -> str:
    """The "Failed cells" section: cell, error, log (empty when every cell finished)."""
    if not failed:
        return ""
    lines = [f"| {f.get('run_id')} | {f.get('error_type')}: {str(f.get('message')).replace('|', '/')} | "
             f"{f.get('log') or '–'} |" for f in failed]
    return f"## Failed cells\n\n{FAILED_NOTE}\n\n| cell | error | log |\n|---|---|---|\n" + "\n".join(lines) + "\n\n"


def _failed_html(failed: list[dict]) -> str:
    if not failed:
        return ""
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
        f.get("run_id"), f"{f.get('error_type')}: {f.get('message')}", f.get("log") or "–")) + "</tr>" for f in failed)
    return (f"<h2>Failed cells</h2><p>{FAILED_NOTE}</p><table><tr><th>cell</th><th>error</th><th>log</th></tr>"
            f"{rows}</table>")


def _write_failures_only(run_dir: Path, failed: list[dict]) -> tuple[Path, Path]:
    """The report of a run in which no cell finished: the failed cells alone."""
    name = run_dir.name
    atomic_write_text(run_dir / "report.md", f"# Experiment `{name}`\n\nNo cell finished.\n\n{failed_markdown(failed)}")
    atomic_write_text(run_dir / "report.html", f"""<!doctype html><html><head><meta charset="utf-8">
<title>tunelab: {html.escape(name)}</title></head><body><h1>Experiment <code>{html.escape(name)}</code></h1>
<p>No cell finished.</p>{_failed_html(failed)}</body></html>
""")
    return run_dir / "report.md", run_dir / "report.html"


def _html(name, rows, results, notes, loss_png, quality_png, stage_md="", section_pngs=None, failed=()) -> str:
    extra = pricing.columns(rows)  # cost columns, with a price per device-hour
    header = ["method", "train size", "seeds", "score", "trainable params", "% of model", "train s", "tokens/s",
              "peak RSS MB", "latency ms", *(h for h, _ in extra)]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r["method"], r["train_size"], r["seeds"], f"{r['score']:.4f} ± {r['score_ci95']:.4f}",
            f"{r['trainable_parameters']:,}", f"{r['trainable_percent']:.2f}", f"{r['train_seconds']:.0f}",
            f"{r['tokens_per_second']:.0f}", f"{r['peak_memory_mb']:.0f}",
            "–" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}", *(cell(r) for _, cell in extra))) + "</tr>"
        for r in rows)
    cost_note = markdown_html.to_html(pricing.note(rows))
    note_items = "".join(f"<li>{html.escape(line.removeprefix('- '))}</li>" for line in notes.splitlines())
    # the family sections (stages, distillation, baselines, multi-task) as the markdown report has them
    sections_html = markdown_html.to_html(stage_md, section_pngs)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>tunelab: {html.escape(name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>Experiment <code>{html.escape(name)}</code></h1>
<p>Model <code>{html.escape(results[0]['model'])}</code>, objective <code>{html.escape(results[0]['objective'])}</code>,
{len(results)} run(s).</p>
<h2>Results</h2><table><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr>{body}</table>{cost_note}{_failed_html(list(failed))}
<h2>Plots</h2>{markdown_html.image('loss curves', loss_png)}{markdown_html.image('quality vs trainable parameters', quality_png)}
{sections_html}
<h2>Methods</h2><ul>{note_items}</ul></body></html>
"""
