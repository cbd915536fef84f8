"""``tunelab slides RUN_DIR``: a ~10-slide deck for a 15-minute talk, built only from the result files.

Slides: title, the question, the methods and their math (registry notes), the set-up, the results
table, quality vs parameters, the Pareto plots (memory, time, and training cost when the run has a price
per device-hour, :mod:`tunelab.experiments.pricing`), trade-offs (Pareto frontiers),
statistical ties, the recommendation, and the tuning summary when ``tunelab tune`` ran in the folder.

``slides.html`` is one self-contained file (plots inlined as base64 PNG; arrow keys / space move
between slides; one 16:9 page per slide when printed). ``slides.pdf`` is printed from it by headless
Chromium (``--print-to-pdf``) when a Chromium binary is found; otherwise the PDF is skipped with a
message saying how to install one.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import subprocess
from pathlib import Path

from tunelab.experiments import analysis, pricing, rundir
from tunelab.experiments.report import load_results, plot_quality_vs_parameters, summarize
from tunelab.utils import atomic_write_text

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
ITEMS_PER_SLIDE = 6  # bullets of frontiers or recommendations per slide (more overflow the page)
METHODS_PER_SLIDE = 5


def find_chromium() -> str | None:
    """A headless-capable Chromium: ``$TUNELAB_CHROMIUM``, else the first known name on PATH."""
    override = os.environ.get("TUNELAB_CHROMIUM")
    if override:
        return override if Path(override).is_file() else None
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def chromium_command(binary: str, *args: str) -> list[str]:
    """Headless Chromium that works as root and in containers (no sandbox, no GPU, no first-run UI)."""
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--hide-scrollbars", *args]


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _slide(title: str, body: str, kind: str = "") -> str:
    return f'<section class="slide {kind}"><h2>{html.escape(title)}</h2><div class="body">{body}</div></section>'


def _paged(title: str, items: list[str], per_slide: int, kind: str = "") -> list[str]:
    """``items`` as bullet slides of at most ``per_slide`` each, all titled ``title`` (more overflow the page)."""
    return [_slide(title, _bullets(items[start:start + per_slide]), kind) for start in range(0, len(items), per_slide)]


def _bullets(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _setup(results: list[dict]) -> list[str]:
    config = results[0].get("config", {})
    data, train = config.get("data", {}), config.get("train", {})
    sizes = sorted({r["train_size"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    esc = html.escape
    return [
        f"Model <code>{esc(results[0]['model'])}</code>, objective <code>{esc(results[0]['objective'])}</code>",
        f"Data: {esc(str(data.get('source', '?')))} · tasks {esc(', '.join(map(str, data.get('tasks', []))))} · "
        f"domain {esc(str(data.get('domain', '?')))} · training sizes {', '.join(map(str, sizes))} · "
        f"test {results[0].get('data_sizes', {}).get('test', '?')} held-out examples",
        f"Training: {train.get('max_steps', '?')} steps, batch {train.get('batch_size', '?')}, "
        f"{esc(str(train.get('schedule', '?')))} schedule; per-method learning rates as configured",
        f"Seeds: {', '.join(map(str, seeds))} — {'mean ± 95% CI (Student t)' if len(seeds) > 1 else 'one seed: no intervals'}",
        f"Score: each task's main held-out metric; memory = process peak RSS; versions "
        f"{esc(', '.join(f'{k} {v}' for k, v in results[0].get('versions', {}).items()))}",
    ]


def _results_table(rows: list[dict]) -> str:
    header = ["method", "train size", "seeds", "score", "trainable params", "peak MB", "train s"]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
        r["method"], r["train_size"], r["seeds"],
        f"{r['score']:.4f}" + (f" ± {r['score_ci95']:.4f}" if r["seeds"] > 1 else ""),
        f"{r['trainable_parameters']:,}", f"{r['peak_memory_mb']:.0f}", f"{r['train_seconds']:.0f}")) + "</tr>"
        for r in rows)
    return f"<table><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr>{body}</table>"


def _caption(size: int, scope: str, split: bool) -> str:
    """``n=SIZE``, plus the test data when cells of that size are scored on several test sets."""
    return html.escape(f"n={size}" + (f" ({scope})" if split and scope else ""))


def _tradeoffs(rows: list[dict]) -> list[str]:
    items = []
    for size, scope, split, group in analysis.ranked_groups(rows):
        caption = _caption(size, scope, split)
        for cost, label, fmt in analysis.costs(group):
            front = analysis.frontier(group, cost)
            steps = " → ".join(f"<b>{html.escape(r['method'])}</b> (≤ {fmt.format(r[cost])})" for r in front)
            items.append(f"{caption}, {label}: {steps}")
    return items


def _cost_plot(rows: list[dict]) -> str:
    """The quality-vs-training-cost plot with a line saying what the cost is and where it was measured."""
    image = _image(analysis.plot_pareto(rows, pricing.COST_KEY, pricing.cost_label(rows)), "pareto cost")
    devices = " / ".join(dict.fromkeys(r["device"] for r in rows if pricing.COST_KEY in r))
    return (image.replace("<img ", '<img style="max-height:500px" ', 1) + '<p class="small">training cost = train '
            f"s / 3600 × training processes × price per device-hour; measured on {html.escape(devices)}</p>")


def _ties(rows: list[dict]) -> list[str]:
    items = []
    for size, scope, split, group in analysis.ranked_groups(rows):
        best, tied = analysis.ties(group)
        caption = _caption(size, scope, split)
        if best is None:
            continue
        if best["seeds"] < 2:
            items.append(f"{caption}: {html.escape(best['method'])} leads, but with one seed no difference is significant")
        elif tied:
            items.append(f"{caption}: {html.escape(best['method'])} is tied with "
                         f"{html.escape(', '.join(r['method'] for r in tied))} (overlapping 95% CIs)")
        else:
            items.append(f"{caption}: {html.escape(best['method'])} leads; its 95% CI overlaps no other method's")
    return items or ["The cells are scored on different tasks (e.g. single-task baselines): no common ranking"]


def _recommendation(rows: list[dict]) -> list[str]:
    """At the largest training size: the best method and a cheaper tied one, per test set (a grid over
    ``data.domain`` gets one recommendation per domain; one test set, one recommendation)."""
    largest = max(r["train_size"] for r in rows)
    groups = [(scope, split, group) for size, scope, split, group in analysis.ranked_groups(rows) if size == largest]
    if not groups:
        return ["The cells are scored on different tasks (e.g. single-task baselines), so no one of them can be "
                "recommended over another: compare each task's scores in the report."]
    items: list[str] = []
    for scope, split, group in groups:
        best, tied = analysis.ties(group)
        if best is None:
            continue
        where = f"n={largest}" + (f", {scope}" if split and scope else "")
        contenders = [best, *tied]
        cheapest = min(contenders, key=lambda r: (r["peak_memory_mb"], r["trainable_parameters"]))
        interval = f" ± {best['score_ci95']:.4f}" if best["seeds"] > 1 else ""
        items.append(f"Best held-out score at {html.escape(where)}: <b>{html.escape(best['method'])}</b> "
                     f"({best['score']:.4f}{interval})")
        if cheapest is not best:
            items.append(f"Statistically tied and cheaper: <b>{html.escape(cheapest['method'])}</b> "
                         f"({cheapest['trainable_parameters']:,} trainable parameters, "
                         f"{cheapest['peak_memory_mb']:.0f} MB) — recommend it when memory or storage per task matters")
        items.append("Re-run with more seeds where CIs overlap before claiming a winner" if tied or best["seeds"] < 2
                     else "The lead is outside the other methods' 95% CIs")
    return items or ["No finished results to recommend from."]


def _tuning(run_dir: Path) -> str | None:
    report = run_dir / "tune_report.md"
    if not report.is_file():
        return None
    keep = [line for line in report.read_text().splitlines()
            if line.startswith(("Default configuration", "Best (trial", "Gain over", "Trials:"))]
    return _bullets([html.escape(line) for line in keep]) if keep else None


def build_deck(run_dir: str | Path, price_per_hour: float | None = None) -> str:
    """The deck's HTML (one string, self-contained); priced as :func:`report.write_report` prices."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    rows = summarize(results, pricing.price_per_hour(run_dir, price_per_hour))
    name = rundir.experiment_name(run_dir, results)
    methods = sorted({r["method_label"]: analysis.method_names(r) for r in results}.items())
    method_of = dict(methods)
    sizes = sorted({r["train_size"] for r in rows})
    slides = [
        f'<section class="slide title"><h1>{html.escape(name)}</h1><p>{len(methods)} methods · '
        f'{len(results)} runs · model <code>{html.escape(results[0]["model"])}</code></p><p class="small">'
        "generated by <code>tunelab slides</code> from the run's result files</p></section>",
        _slide("The question", _bullets([
            f"Which of {html.escape(', '.join(label for label, _ in methods))} gives the best held-out quality "
            "for its cost (trainable parameters, memory, time)?",
            f"Does the answer change with the amount of data ({', '.join(map(str, sizes))} training examples)?",
            "Which differences are real (outside seed-to-seed noise), and which are ties?"])),
    ]
    slides += _paged("Methods and their math",
                     [f"<b>{html.escape(label)}</b> — {html.escape(analysis._method_notes(label, method_of) or name_)}"
                      for label, name_ in methods], METHODS_PER_SLIDE, "dense")
    slides += [
        _slide("Set-up", _bullets(_setup(results))),
        _slide("Results", _results_table(rows), "dense"),
        _slide("Quality vs trainable parameters", _image(plot_quality_vs_parameters(rows), "quality vs parameters")),
        _slide("Quality vs peak memory", _image(analysis.plot_pareto(rows, "peak_memory_mb", "peak memory (MB, RSS)"),
                                                "pareto memory")),
        _slide("Quality vs train time", _image(analysis.plot_pareto(rows, "train_seconds", "train time (s)"),
                                               "pareto time")),
        *([_slide("Quality vs training cost", _cost_plot(rows))] if pricing.priced(rows) else []),
    ]
    # a grid over domains or sizes has a frontier per test set and cost, and a recommendation per test set
    slides += _paged("Trade-offs: best per budget (Pareto frontiers)", _tradeoffs(rows), ITEMS_PER_SLIDE, "dense")
    slides.append(_slide("What is a tie", _bullets(_ties(rows))))
    slides += _paged("Recommendation", _recommendation(rows), ITEMS_PER_SLIDE)
    tuning = _tuning(run_dir)
    if tuning is not None:
        slides.append(_slide("Hyper-parameter search (tunelab tune)", tuning))
    return _page(name, slides)


def _page(name: str, slides: list[str]) -> str:
    style = """
@page{size:1280px 720px;margin:0}
*{box-sizing:border-box}body{margin:0;background:#333;font-family:system-ui,sans-serif}
.slide{width:1280px;height:720px;margin:20px auto;padding:48px 64px;background:#fff;color:#1d2733;
overflow:hidden;position:relative;page-break-after:always;break-after:page}
.slide h1{font-size:56px;margin:180px 0 24px;color:#12497a}.slide h2{font-size:36px;margin:0 0 24px;color:#12497a;
border-bottom:4px solid #f0a030;padding-bottom:8px}.slide li{font-size:24px;margin:10px 0;line-height:1.35}
.dense li{font-size:18px}.slide p{font-size:24px}.small{font-size:16px!important;color:#666}
.slide img{display:block;margin:0 auto;max-height:560px;max-width:100%}
table{border-collapse:collapse;font-size:16px;margin:0 auto}td,th{border:1px solid #bbb;padding:4px 10px}
th{background:#e8f0f8}.slide .num{position:absolute;right:24px;bottom:16px;font-size:14px;color:#888}
@media print{body{background:#fff}.slide{margin:0}}"""
    numbered = [s.replace("</section>", f'<div class="num">{i + 1} / {len(slides)}</div></section>', 1)
                for i, s in enumerate(slides)]
    script = """<script>
document.addEventListener('keydown',e=>{const s=[...document.querySelectorAll('.slide')];
const y=window.scrollY;let i=s.findIndex(x=>x.offsetTop>=y-5);if(i<0)i=0;
if(['ArrowRight','ArrowDown',' ','PageDown'].includes(e.key)){i=Math.min(i+1,s.length-1)}
else if(['ArrowLeft','ArrowUp','PageUp'].includes(e.key)){i=Math.max(i-1,0)}else return;
e.preventDefault();window.scrollTo(0,s[i].offsetTop-20);});</script>"""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(name)} — slides</title>'
            f"<style>{style}</style></head><body>{''.join(numbered)}{script}</body></html>\n")


def print_pdf(html_path: Path, pdf_path: Path, timeout: float = 120.0) -> Path | None:
    """Print the deck to PDF with headless Chromium; None when no Chromium is installed."""
    binary = find_chromium()
    if binary is None:
        return None
    command = chromium_command(binary, "--no-pdf-header-footer", f"--print-to-pdf={pdf_path.resolve()}",
                               html_path.resolve().as_uri())
    subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    return pdf_path if pdf_path.is_file() and pdf_path.stat().st_size > 0 else None


def write_slides(run_dir: str | Path, pdf: bool = True,
                 price_per_hour: float | None = None) -> tuple[Path, Path | None]:
    """Write ``slides.html`` (and ``slides.pdf`` when Chromium is available) into the run directory."""
    run_dir = Path(run_dir)
    html_path = run_dir / "slides.html"
    atomic_write_text(html_path, build_deck(run_dir, price_per_hour))
    pdf_path = print_pdf(html_path, run_dir / "slides.pdf") if pdf else None
    return html_path, pdf_path
