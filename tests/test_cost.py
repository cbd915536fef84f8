"""Cost per cell from a price per device-hour (``report.price_per_hour``, ``tunelab report --price-per-hour``).

Fabricated result files, no training: the formulas, the cost column / frontier / plot with a price and
their absence without, repricing a finished run without touching its results, the price as a cosmetic
field (no cell key changes), one-line errors for a negative price, and the device a time was measured on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.cli import main
from tunelab.experiments import analysis, pricing, slides
from tunelab.experiments.grid import cell_key, expand_grid
from tunelab.experiments.report import summarize, write_report
from tunelab.experiments.spec import validate

#            label, peak MB, train s, scores over 2 seeds
METHODS = [("full", 900.0, 3600.0, [0.60, 0.62]),
           ("lora", 500.0, 1800.0, [0.59, 0.61]),
           ("ia3", 450.0, 900.0, [0.40, 0.41])]
CPU = {"type": "cpu", "name": "Some CPU", "processes": 1, "cpu_count": 2, "torch_threads": 2}


def record(label: str, seed: int, seconds: float, score: float, memory: float = 500.0, **extra) -> dict:
    return {"run_id": f"{label}-n100-s{seed}", "experiment": "fake", "method": label, "method_label": label,
            "model": "tiny-llama", "objective": "sft", "train_size": 100, "seed": seed, "metrics": {"score": score},
            "trainable_parameters": 1000, "trainable_percent": 0.1, "train_seconds": seconds,
            "train_tokens_per_second": 1000.0, "peak_memory_mb": memory, "inference_latency_ms": 36.0,
            "inference_latency_tokens": 100, "device": CPU, "history": [{"step": 1, "loss": 2.0}],
            "config": {}, "versions": {"torch": "2.0+cpu"}, "data_sizes": {"test": 40}, **extra}


def fake_run(run_dir: Path, price: float | None = None) -> Path:
    (run_dir / "results").mkdir(parents=True)
    for label, memory, seconds, scores in METHODS:
        for seed, score in enumerate(scores):
            result = record(label, seed, seconds * (1 + 0.1 * seed), score, memory)
            (run_dir / "results" / f"{result['run_id']}.json").write_text(json.dumps(result))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "fake", "report": {"price_per_hour": price}}))
    return run_dir


def test_cost_is_seconds_over_3600_times_processes_times_price():
    cell = record("lora", 0, 1800.0, 0.5)
    assert pricing.training_cost(cell, 4.0) == pytest.approx(2.0)  # half an hour at 4 per device-hour
    assert pricing.training_cost({**cell, "device": {**CPU, "processes": 2}}, 4.0) == pytest.approx(4.0)
    assert pricing.training_cost({k: v for k, v in cell.items() if k != "device"}, 4.0) == pytest.approx(2.0)
    # 36 ms for 100 prompt tokens = 1e-5 h / 100 tokens; x 1e6 tokens x 10 per hour = 1.0
    assert pricing.inference_cost_per_million(cell, 10.0) == pytest.approx(1.0)
    assert pricing.inference_cost_per_million({**cell, "inference_latency_tokens": None}, 10.0) is None
    row = summarize([cell, record("lora", 1, 3600.0, 0.6)], 4.0)[0]
    assert row["train_cost"] == pytest.approx(3.0) and row["train_cost_ci95"] > 0  # mean of 2 and 4, with a CI
    assert "train_cost" not in summarize([cell])[0]


def test_device_is_named_next_to_the_cost():
    assert pricing.device_text(record("a", 0, 1.0, 0.5)) == "CPU Some CPU, 2 cores, 2 torch threads"
    gpu = {"type": "cuda", "name": "NVIDIA H200", "processes": 4, "cpu_count": 16, "torch_threads": 16}
    assert pricing.device_text(record("a", 0, 1.0, 0.5, device=gpu)) == "CUDA NVIDIA H200 ×4"
    old = {k: v for k, v in record("a", 0, 1.0, 0.5).items() if k != "device"}
    assert "CPU" in pricing.device_text(old) and "not recorded" in pricing.device_text(old)
    assert pricing.device_text({**old, "versions": {"torch": "2.4.0"}}) == "not recorded"


def test_report_with_a_price_has_the_cost_column_frontier_and_plot(tmp_path):
    run_dir = fake_run(tmp_path / "run", price=2.0)
    write_report(run_dir)
    markdown = (run_dir / "report.md").read_text()
    assert "| train cost | inference cost / 1M tokens | device (cost measured on) |" in markdown
    # ia3: 900 s and 990 s at 2 per hour -> 0.5 and 0.55, mean 0.525; inference 2 x 1e-5 h / 100 x 1e6 = 0.2
    assert "| 0.525 ± 0.32 | 0.2 | CPU Some CPU, 2 cores, 2 torch threads |" in markdown
    section = markdown[markdown.index("## Analysis"):markdown.index("## Methods")]
    assert "Budget in training cost (units at 2 per device-hour): ≤ 0.525 → **ia3**" in section
    assert "≤ 1.05 → **lora**" in section and "≤ 2.1 → **full**" in section
    assert "![quality vs training cost](plots/pareto_cost.png)" in section
    assert (run_dir / "plots" / "pareto_cost.png").stat().st_size > 1000
    page = (run_dir / "report.html").read_text()
    assert "<th>train cost</th>" in page and 'alt="pareto_cost"' in page and "a CPU cost is not a GPU cost" in page
    rows = summarize([json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*.json"))], 2.0)
    assert any("training cost" in item and "<b>ia3</b> (≤ 0.525)" in item for item in slides._tradeoffs(rows))
    deck = slides.build_deck(run_dir)
    assert "Quality vs training cost" in deck and "measured on CPU Some CPU" in deck


def test_report_without_a_price_has_no_cost(tmp_path):
    run_dir = fake_run(tmp_path / "run", price=None)
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "pareto_cost.png").write_bytes(b"an earlier priced build")
    write_report(run_dir)
    markdown, page = (run_dir / "report.md").read_text(), (run_dir / "report.html").read_text()
    assert "train cost" not in markdown and "training cost" not in markdown and "pareto_cost" not in markdown
    assert "train cost" not in page and 'alt="pareto_cost"' not in page
    assert not (run_dir / "plots" / "pareto_cost.png").exists()
    rows = summarize([json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*.json"))])
    assert analysis.costs(rows) == analysis.COSTS
    assert not any("cost" in item for item in slides._tradeoffs(rows))
    assert "Quality vs training cost" not in slides.build_deck(run_dir)


def test_report_cli_reprices_without_touching_results(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", price=2.0)
    before = {p.name: p.read_bytes() for p in (run_dir / "results").glob("*.json")}
    config = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    assert "≤ 0.525 → **ia3**" in (run_dir / "report.md").read_text()
    assert "@2/h" in capsys.readouterr().out  # the console table prices at the run's own rate
    assert main(["report", str(run_dir), "--price-per-hour", "4"]) == 0
    assert "@4/h" in capsys.readouterr().out
    markdown = (run_dir / "report.md").read_text()
    assert "Cost at 4 units per device-hour" in markdown and "≤ 1.05 → **ia3**" in markdown
    assert "≤ 0.525 → **ia3**" not in markdown
    assert {p.name: p.read_bytes() for p in (run_dir / "results").glob("*.json")} == before
    assert (run_dir / "config.yaml").read_bytes() == config  # a one-off price: the run's own stays


@pytest.mark.parametrize("argv", [["--price-per-hour", "-1"], ["--price-per-hour", "inf"]])
def test_a_negative_price_is_a_one_line_error(tmp_path, capsys, argv):
    run_dir = fake_run(tmp_path / "run")
    assert main(["report", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "price per device-hour must be a number >= 0" in err
    assert not (run_dir / "report.md").exists()


def test_a_negative_price_in_the_spec_or_config_yaml_is_a_one_line_error(tmp_path, capsys):
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'report.price_per_hour': Input should be greater than or equal to 0"):
        validate({"name": "x", "report": {"price_per_hour": -0.5}})
    run_dir = fake_run(tmp_path / "run", price=-3)  # a hand-edited config.yaml
    assert main(["report", str(run_dir)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_price_is_cosmetic_so_no_cell_reruns_for_it():
    raw = {"name": "x", "grid": {"seeds": [0, 1]}}
    plain = [cell_key(c) for c in expand_grid(validate(raw))]
    priced = [cell_key(c) for c in expand_grid(validate({**raw, "report": {"price_per_hour": 3.5}}))]
    assert plain == priced


def test_a_new_price_is_written_into_config_yaml_when_no_cell_reruns(tmp_path):
    run_dir = fake_run(tmp_path / "run", price=1.0)
    pricing.sync_config(run_dir, {"price_per_hour": 5.0})
    assert pricing.price_per_hour(run_dir) == 5.0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["name"] == "fake"  # the rest is kept
    assert pricing.price_per_hour(run_dir, 7) == 7.0  # the command line's price wins
    assert pricing.price_per_hour(tmp_path / "elsewhere") is None  # no config.yaml: no cost


def test_latency_records_its_tokens_and_the_device():
    from tunelab.experiments import environment, runner

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def forward(self, input_ids, attention_mask):
            return self.embed(input_ids) * attention_mask[..., None]

    def collate(records):
        return {"input_ids": torch.ones(len(records), 5, dtype=torch.long),
                "attention_mask": torch.tensor([[1, 1, 1, 0, 0]] * len(records)), "labels": None}

    latency, tokens = runner._latency_ms(Tiny(), collate, [{}] * 10, batches=2)
    assert latency > 0 and tokens == 8 * 3  # 8 examples x 3 non-padding tokens
    assert runner._latency_ms(Tiny(), collate, [{}], batches=0) == (None, None)
    device = environment.device_info(Tiny())
    assert device["type"] == "cpu" and device["processes"] == 1 and device["cpu_count"] >= 1
    assert device["torch_threads"] == torch.get_num_threads()


def test_a_real_run_records_device_and_latency_tokens_and_a_new_price_reruns_nothing(tmp_path, small_model_dir):
    """One tiny in-process cell priced at 3, then the same spec at 6: the cell is skipped (same key, same
    result bytes), config.yaml takes the new price, and the report's cost doubles."""
    from tunelab.experiments.runner import run_experiment

    raw = {"name": "exp", "output_dir": str(tmp_path), "model": {"name": str(small_model_dir)},
           "method": {"name": "lora", "options": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
           "data": {"tasks": ["summarization"], "train_size": 8, "eval_size": 0, "test_size": 2},
           "train": {"max_steps": 1, "batch_size": 4}, "eval": {"max_new_tokens": 2, "latency_batches": 1},
           "report": {"price_per_hour": 3.0}}
    [first] = run_experiment(validate(raw), progress=False, isolate=False)
    assert first["device"]["type"] == "cpu" and first["device"]["processes"] == 1
    assert first["inference_latency_tokens"] > 0 and first["inference_latency_ms"] > 0
    effi = first["efficiency"]  # PEFT method_comparison's figures: memory mean / p99 / max, merged latency, size
    for phase in ("train_memory_mb", "inference_memory_mb"):
        assert effi[phase]["samples"] >= 2 and 0 < effi[phase]["mean"] <= effi[phase]["p99"] <= effi[phase]["max"]
    assert effi["memory_source"] == "rss" and effi["latency_ms_unmerged"] == first["inference_latency_ms"]
    assert effi["latency_ms_merged"] > 0 and 0 < effi["adapter_mb"] < 1
    run_dir = tmp_path / "exp"
    assert "## Efficiency: memory, latency merged / unmerged, adapter size" in (run_dir / "report.md").read_text()
    result = run_dir / "results" / f"{first['run_id']}.json"
    before = result.read_bytes()
    cost = pricing.money(pricing.training_cost(first, 3.0))
    assert f"| {cost} |" in (run_dir / "report.md").read_text()
    run_experiment(validate({**raw, "report": {"price_per_hour": 6.0}}), progress=False, isolate=False)
    assert result.read_bytes() == before
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["report"] == {"price_per_hour": 6.0}
    assert f"| {pricing.money(pricing.training_cost(first, 6.0))} |" in (run_dir / "report.md").read_text()


def test_an_unpriced_rerun_leaves_an_older_config_yaml_alone(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: old\n")  # written before the report section existed
    pricing.sync_config(run_dir, {"price_per_hour": None})
    assert (run_dir / "config.yaml").read_text() == "name: old\n"
