"""The written analysis, the Pareto plots, `tunelab slides`, and both pages in headless Chromium.

The analysis is checked on hand-made result files (no training): the Pareto frontier, CI ties, the
registry's notes as the "why". The browser tests open report.html and slides.html in Debian's
`chromium` (skipped with a reason when it is absent), check that every <img> decoded, and that a
screenshot is not blank (many distinct colours).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.experiments import analysis
from tunelab.experiments.report import summarize, write_report
from tunelab.experiments.slides import chromium_command, find_chromium, write_slides

#            label, params, peak MB, train s, scores over 3 seeds
METHODS = [("full", 100_000, 900.0, 60.0, [0.60, 0.62, 0.61]),
           ("lora", 2_000, 500.0, 30.0, [0.59, 0.61, 0.60]),
           ("ia3", 300, 450.0, 25.0, [0.40, 0.41, 0.39])]


def fake_run(run_dir: Path, methods=METHODS) -> Path:
    (run_dir / "results").mkdir(parents=True)
    for label, params, memory, seconds, scores in methods:
        for seed, score in enumerate(scores):
            record = {
                "run_id": f"{label}-n100-s{seed}", "experiment": "fake", "method": label, "method_label": label,
                "model": "tiny-llama", "objective": "sft", "train_size": 100, "seed": seed,
                "metrics": {"score": score}, "trainable_parameters": params, "trainable_percent": params / 1e4,
                "train_seconds": seconds, "train_tokens_per_second": 1000.0, "peak_memory_mb": memory,
                "inference_latency_ms": 5.0, "history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
                "config": {"data": {"source": "synthetic", "tasks": ["summarization"], "domain": "medical"},
                           "train": {"max_steps": 2, "batch_size": 4, "schedule": "cosine"}},
                "versions": {"torch": "x"}, "data_sizes": {"test": 40},
            }
            (run_dir / "results" / f"{record['run_id']}.json").write_text(json.dumps(record))
    return run_dir


def rows_of(run_dir: Path) -> list[dict]:
    return summarize([json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*.json"))])


def test_frontier_keeps_only_methods_better_than_every_cheaper_one(tmp_path):
    rows = rows_of(fake_run(tmp_path / "run"))
    assert [r["method"] for r in analysis.frontier(rows, "trainable_parameters")] == ["ia3", "lora", "full"]
    dominated = [{**r, "peak_memory_mb": 1000.0} if r["method"] == "lora" else r for r in rows]
    assert [r["method"] for r in analysis.frontier(dominated, "peak_memory_mb")] == ["ia3", "full"]


def test_ties_are_overlapping_95_percent_intervals(tmp_path):
    rows = rows_of(fake_run(tmp_path / "run"))
    best, tied = analysis.ties(rows)
    assert best["method"] == "full"
    assert [r["method"] for r in tied] == ["lora"]  # 0.600 ± 0.025 overlaps 0.610 ± 0.025; ia3 does not
    single = [{**r, "seeds": 1, "score_ci95": 0.0} for r in rows]
    assert analysis.ties(single)[1] == []


def test_report_gets_the_analysis_and_pareto_plots(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    write_report(run_dir)
    markdown = (run_dir / "report.md").read_text()
    section = markdown[markdown.index("## Analysis"):markdown.index("## Methods")]
    assert "**Best score: full**" in section and "Statistically tied with it" in section and "lora" in section
    assert "≤ 300 → **ia3**" in section
    from tunelab.tuners import registry

    assert registry.get("lora").notes[:40] in section  # the why: the registry's math
    for name in ("pareto_memory", "pareto_time"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 1000
    page = (run_dir / "report.html").read_text()
    assert '<section id="analysis">' in page and page.count("data:image/png;base64,") >= 4


def test_cells_scored_on_different_tasks_are_not_ranked_against_each_other(tmp_path):
    """Single-task baselines of a multi-task study: a NER F1 of 0.99 is not 'better' than a QA score."""
    run_dir = fake_run(tmp_path / "run")
    for path in (run_dir / "results").glob("*.json"):  # ia3 now scores another task than full and lora
        record = json.loads(path.read_text())
        task = "ner" if record["method"] == "ia3" else "qa"
        record["metrics"] = {"score": record["metrics"]["score"], f"{task}/score": record["metrics"]["score"]}
        path.write_text(json.dumps(record))
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*.json"))]
    section = analysis.markdown_section(results, summarize(results))
    assert "### 100 training examples, scored on qa" in section and "**Best score: full**" in section
    assert "not ranked" in section and "ia3 (ner)" in section
    assert "→ **ia3**" not in section  # not on a frontier it does not share
    from tunelab.experiments import slides

    rows = summarize(results)
    assert all("(qa)" in item and "ia3" not in item for item in slides._ties(rows) + slides._tradeoffs(rows))
    assert "<b>full</b>" in slides._recommendation(rows)[0]
    apart = [{**row, "metrics": {f"{row['method']}/score": row["score"]}} for row in rows]  # every cell its own task
    assert "different tasks" in slides._recommendation(apart)[0] and "different tasks" in slides._ties(apart)[0]


def test_cells_scored_on_different_domains_are_ranked_per_domain(tmp_path):
    """A grid over data.domain: the legal cells' best is named among legal cells only, never against medical."""
    run_dir = fake_run(tmp_path / "run")
    for path in (run_dir / "results").glob("*.json"):  # ia3 alone scored on the legal domain
        record = json.loads(path.read_text())
        record["config"]["data"].update(domain="legal" if record["method"] == "ia3" else "medical")
        path.write_text(json.dumps(record))
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*.json"))]
    rows = summarize(results)
    assert {r["method"]: dict(r["test_data"])["domain"] for r in rows} == {"full": "medical", "lora": "medical",
                                                                            "ia3": "legal"}
    section = analysis.markdown_section(results, rows)
    assert "### 100 training examples, scored on domain=medical" in section and "**Best score: full**" in section
    assert "ia3 (domain=legal)" in section  # alone on its test set: listed, not ranked
    assert "→ **ia3**" not in section
    legal = tuple((key, "legal" if key == "domain" else value) for key, value in rows[0]["test_data"])
    two_legal = rows + [{**rows[0], "method": "lora-legal", "test_data": legal}]  # now legal has two cells
    scopes = [scope for _, scope, _, _ in analysis.ranked_groups(two_legal)]
    assert scopes == ["domain=legal", "domain=medical"]
    from tunelab.experiments import slides

    best = [item for item in slides._recommendation(two_legal) if item.startswith("Best held-out")]
    assert len(best) == 2 and "domain=legal" in best[0] and "domain=medical" in best[1]  # one per domain


def test_score_axis_of_pareto_plots_starts_at_zero(tmp_path, monkeypatch):
    seen = []
    real = analysis.score_axis

    def spy(axis, values, **kwargs):
        real(axis, values, **kwargs)
        seen.append(axis.get_ylim())
    monkeypatch.setattr(analysis, "score_axis", spy)
    analysis.plot_pareto(rows_of(fake_run(tmp_path / "run")), "peak_memory_mb", "peak memory")
    assert seen and seen[0][0] == 0.0


def test_slides_cli_writes_a_ten_slide_deck(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run")
    assert main(["slides", str(run_dir), "--no-pdf"]) == 0
    deck = (run_dir / "slides.html").read_text()
    assert 10 <= deck.count('<section class="slide') <= 14
    for title in ("The question", "Methods and their math", "Set-up", "Results", "Quality vs peak memory",
                  "Trade-offs", "Recommendation"):
        assert title in deck
    assert "src=\"http" not in deck and "<link" not in deck  # self-contained
    assert "Statistically tied and cheaper: <b>lora</b>" in deck


def test_slides_without_results_is_a_one_line_error(tmp_path, capsys):
    assert main(["slides", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (install Debian's `chromium` "
                                    "package, or set TUNELAB_CHROMIUM); browser checks skipped")
PROBE = ('<script>window.addEventListener("load",()=>{document.title="images:"+[...document.images].filter('
         'i=>i.complete&&i.naturalWidth>0).length+"/"+document.images.length})</script>')


def rendered_images(page: Path) -> str:
    """``images:<decoded>/<total>`` as Chromium sees the page after its load event."""
    probe = page.with_name(page.stem + "-probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    out = subprocess.run(chromium_command(CHROMIUM, "--dump-dom", probe.as_uri()), capture_output=True,
                         text=True, timeout=90)
    return out.stdout.split("<title>")[1].split("</title>")[0]


def distinct_colours(page: Path, shot: Path) -> int:
    from PIL import Image

    subprocess.run(chromium_command(CHROMIUM, "--window-size=1320,2000", f"--screenshot={shot}", page.as_uri()),
                   capture_output=True, timeout=90)
    with Image.open(shot) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 24) or [])


@needs_chromium
def test_report_html_renders_every_plot_in_chromium(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    write_report(run_dir)
    decoded, total = map(int, rendered_images(run_dir / "report.html").removeprefix("images:").split("/"))
    assert total >= 4 and decoded == total
    assert distinct_colours(run_dir / "report.html", tmp_path / "report.png") > 200  # text + plots, not blank


@needs_chromium
def test_slides_render_in_chromium_and_print_to_pdf(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    html_path, pdf_path = write_slides(run_dir)
    decoded, total = map(int, rendered_images(html_path).removeprefix("images:").split("/"))
    assert total >= 3 and decoded == total
    assert distinct_colours(html_path, tmp_path / "slides.png") > 100
    assert pdf_path is not None and pdf_path.read_bytes()[:5] == b"%PDF-"
    assert pdf_path.read_bytes().count(b"/Type /Page") - pdf_path.read_bytes().count(b"/Type /Pages") >= 10


def test_console_table_gives_the_95_percent_interval_like_the_report(tmp_path):
    """The CLI's results table and report.md print the same 'mean ± 95% CI' (not ± the standard deviation)."""
    from rich.console import Console

    from tunelab.cli import _results_table
    from tunelab.experiments.plots import ci95

    run_dir = fake_run(tmp_path / "run")
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*.json"))]
    console = Console(width=200, record=True)
    console.print(_results_table(results))
    text = console.export_text()
    lora = next(m for m in METHODS if m[0] == "lora")[4]
    assert "95% CI" in text and f"± {ci95(list(lora)):.4f}" in text


def test_report_and_slides_take_the_name_from_the_runs_own_config(tmp_path):
    """Results reused from another run by cell key carry that run's experiment name; the title is this run's."""
    from tunelab.experiments import slides

    run_dir = fake_run(tmp_path / "run")  # every result says experiment "fake"
    write_report(run_dir)
    assert (run_dir / "report.md").read_text().startswith("# Experiment `fake`")  # no config.yaml: the results'
    (run_dir / "config.yaml").write_text("name: combined\n")
    write_report(run_dir)
    assert (run_dir / "report.md").read_text().startswith("# Experiment `combined`")
    assert "<h1>combined</h1>" in slides.build_deck(run_dir)
