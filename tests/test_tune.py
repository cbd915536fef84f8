"""`tunelab tune`: Optuna studies over the spec's search space, on a tiny random model.

Checked: a 3-trial study writes a best.yaml that loads and whose values are the best trial's; trial 0
is the spec's own configuration; a second worker *process* on the same SQLite study adds trials
without rerunning any; median pruning stops a deliberately bad trial; equal-budget mode gives every
method the same number of trials and a best.yaml grid; a spec without `search:` is a one-line error.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from tunelab.cli import main
from tunelab.experiments.spec import load_spec
from tunelab.experiments.tune import storage_url, tune

SEARCH = """search:
  metric: eval_loss
  direction: minimize
  params:
    train.learning_rate: {type: float, low: 1.0e-5, high: 0.9, log: true}
    method.options.r: {type: int, low: 2, high: 8}
  pruning: {startup_trials: 1}
"""


def write_spec(tmp_path: Path, model_dir: Path, name: str = "search", extra: str = SEARCH) -> Path:
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"name: {name}\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: '{model_dir}'}}\n"
        "method: {name: lora, options: {r: 4}}\n"
        "data: {tasks: [summarization], domain: medical, train_size: 8, eval_size: 4, test_size: 2}\n"
        "train: {max_steps: 4, batch_size: 4, eval_every: 2, save_every: null, learning_rate: 1.0e-3}\n"
        "eval: {max_new_tokens: 4, latency_batches: 0}\n" + extra
    )
    return config


@pytest.fixture(scope="module")
def three_trials(tmp_path_factory, small_model_dir):
    tmp_path = tmp_path_factory.mktemp("tune")
    config = write_spec(tmp_path, small_model_dir)
    spec = load_spec(config)
    return config, spec, tune(spec, trials=3)


def test_three_trials_write_a_best_yaml_that_loads(three_trials):
    _, spec, outcome = three_trials
    study = outcome.studies["lora"]
    assert len(study.trials) == 3
    first = study.trials[0]
    assert first.user_attrs.get("default") and first.params == {"train.learning_rate": 1e-3, "method.options.r": 4}
    best = load_spec(outcome.best_yaml)
    assert best.name == "search-best"
    assert best.search is None
    assert best.train.learning_rate == pytest.approx(study.best_params["train.learning_rate"])
    assert best.method.options["r"] == study.best_params["method.options.r"]
    assert best.train.max_steps == spec.train.max_steps  # everything not searched is the spec's own
    run_dir = spec.run_dir
    assert (run_dir / "tune.db").is_file()
    assert sorted(p.name for p in (run_dir / "trials").glob("*.json")) == \
        [f"lora-trial{n:03d}.json" for n in range(3)]
    record = json.loads((run_dir / "trials" / f"lora-trial{study.best_trial.number:03d}.json").read_text())
    assert record["final_eval_loss"] == pytest.approx(study.best_value)
    report = (run_dir / "tune_report.md").read_text()
    assert "Default configuration (trial 0)" in report and "tune_history.png" in report
    assert (run_dir / "plots" / "tune_history.png").stat().st_size > 1000
    assert "data:image/png;base64," in (run_dir / "tune_report.html").read_text()


def test_a_second_worker_process_adds_trials_without_repeating_any(three_trials):
    config, spec, _ = three_trials
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    completed = subprocess.run([sys.executable, "-m", "tunelab.cli", "tune", str(config), "--trials", "2",
                                "--storage", storage_url(spec, None)], capture_output=True, text=True,
                               env=env, timeout=120)
    assert completed.returncode == 0, completed.stderr
    study = optuna.load_study(study_name="search", storage=storage_url(spec, None))
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert sum(bool(t.user_attrs.get("default")) for t in study.trials) == 1  # not enqueued again
    run_ids = [t.user_attrs["run_id"] for t in study.trials]
    assert len(set(run_ids)) == 5
    assert len(list((spec.run_dir / "trials").glob("*.json"))) == 5 - sum(
        t.state == optuna.trial.TrialState.PRUNED for t in study.trials)


def test_median_pruning_stops_a_deliberately_bad_trial(tmp_path, small_model_dir):
    spec = load_spec(write_spec(tmp_path, small_model_dir, name="prune"))
    spec.run_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="prune", storage=storage_url(spec, None), direction="minimize")
    study.enqueue_trial({"train.learning_rate": 0.5, "method.options.r": 8})
    # a learning rate 50,000x smaller: its eval loss stays at the start while the first trial's falls
    study.enqueue_trial({"train.learning_rate": 1e-5, "method.options.r": 8})
    outcome = tune(spec, trials=2)
    states = [t.state for t in outcome.studies["lora"].trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    pruned = outcome.studies["lora"].trials[1]
    assert pruned.intermediate_values  # it was stopped on its eval curve
    assert not (spec.run_dir / "trials" / "lora-trial001.json").exists()
    assert not (spec.run_dir / ".work" / "lora-trial001").exists()


def test_equal_budget_gives_every_method_the_same_trials(tmp_path, small_model_dir):
    extra = SEARCH + "  per_method: true\ngrid: {methods: [{name: lora}, {name: ia3}], seeds: [0]}\n"
    spec = load_spec(write_spec(tmp_path, small_model_dir, name="equal", extra=extra))
    outcome = tune(spec, trials=1, isolate=False)
    assert {label: len(s.trials) for label, s in outcome.studies.items()} == {"lora": 1, "ia3": 1}
    assert "method.options.r" not in outcome.studies["ia3"].trials[0].params  # ia3 has no r
    best = load_spec(outcome.best_yaml)
    assert [m.name for m in best.grid.methods] == ["lora", "ia3"]
    assert "## Equal budget" in (spec.run_dir / "tune_report.md").read_text()
    # then the comparison runs every method at its best configuration, as an ordinary experiment
    assert [r["method_label"] for r in outcome.comparison] == ["lora", "ia3"]
    assert (tmp_path / "runs" / "equal-best" / "report.md").is_file()


def test_a_worker_that_finishes_while_another_still_runs_trials_leaves_the_comparison(tmp_path, small_model_dir):
    """Two workers on one storage: the first to finish must not compare best configurations that the
    other's running trials may still beat; it writes best.yaml and says who compares."""
    extra = SEARCH + "  per_method: true\ngrid: {methods: [{name: lora}, {name: ia3}], seeds: [0]}\n"
    spec = load_spec(write_spec(tmp_path, small_model_dir, name="two", extra=extra))
    spec.run_dir.mkdir(parents=True)
    other = optuna.create_study(study_name="two.ia3", storage=storage_url(spec, None), direction="minimize")
    other.ask()  # the other worker's trial, still running
    said = io.StringIO()
    outcome = tune(spec, trials=1, isolate=False, console=Console(file=said, width=200))
    assert outcome.comparison is None and outcome.best_yaml.is_file()
    assert not (tmp_path / "runs" / "two-best").exists()
    assert "1 trial(s) still running in other workers" in said.getvalue()


def test_a_relative_learning_rate_scales_each_methods_own_rate(tmp_path, small_model_dir):
    """relative: true samples a factor; each method's cell runs at factor x its own rate, trial 0 at x1."""
    extra = ("search:\n  metric: eval_loss\n  direction: minimize\n  per_method: true\n  params:\n"
             "    train.learning_rate: {type: float, low: 0.25, high: 4.0, log: true, relative: true}\n"
             "grid: {methods: [{name: lora, train: {learning_rate: 2.0e-3}}, "
             "{name: ia3, train: {learning_rate: 3.0e-2}}], seeds: [0]}\n")
    spec = load_spec(write_spec(tmp_path, small_model_dir, name="relative", extra=extra))
    outcome = tune(spec, trials=2, compare=False)
    for label, own in (("lora", 2e-3), ("ia3", 3e-2)):
        trials = outcome.studies[label].trials
        assert trials[0].params == {"train.learning_rate": 1.0}  # trial 0: the method's own rate
        for trial in trials:
            factor = trial.params["train.learning_rate"]
            assert 0.25 <= factor <= 4.0
            ran = trial.user_attrs["values"]["train.learning_rate"]
            assert ran == pytest.approx(factor * own)
            record = json.loads((spec.run_dir / "trials" / f"{trial.user_attrs['run_id']}.json").read_text())
            assert record["config"]["train"]["learning_rate"] == pytest.approx(ran)
    best = load_spec(outcome.best_yaml)
    rates = {m.name: m.train["learning_rate"] for m in best.grid.methods}
    for label, study in outcome.studies.items():  # best.yaml holds the absolute rate, not the factor
        assert rates[label] == pytest.approx(study.best_trial.user_attrs["values"]["train.learning_rate"])
    assert "of each method's own value" in (spec.run_dir / "tune_report.md").read_text()


def test_a_relative_key_the_spec_gives_no_value_is_a_one_line_error(tmp_path, small_model_dir):
    from tunelab.errors import ConfigError

    extra = ("search:\n  params:\n    method.options.lora_dropout: {type: float, low: 0.5, high: 2.0, "
             "relative: true}\n")
    spec = load_spec(write_spec(tmp_path, small_model_dir, name="norel", extra=extra))
    with pytest.raises(ConfigError, match="relative"):
        tune(spec, trials=1)
    bad = "search:\n  params:\n    method.options.r: {type: int, low: 1, high: 4, relative: true}\n"
    with pytest.raises(ConfigError, match="float"):
        load_spec(write_spec(tmp_path, small_model_dir, name="relint", extra=bad))


def test_a_method_that_cannot_apply_fails_before_any_trial(tmp_path, small_model_dir, capsys):
    """P-Tuning v2 wants a classification head a causal LM lacks: one line, no trial, no traceback."""
    extra = SEARCH + "  per_method: true\ngrid: {methods: [{name: lora}, {name: p_tuning_v2}], seeds: [0]}\n"
    config = write_spec(tmp_path, small_model_dir, name="noapply", extra=extra)
    assert main(["tune", str(config), "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p_tuning_v2" in err[0] and "modules_to_save" in err[0]
    assert not (tmp_path / "runs" / "noapply" / "trials").exists()


def test_a_spec_without_search_is_a_one_line_error(tmp_path, small_model_dir, capsys):
    config = write_spec(tmp_path, small_model_dir, name="plain", extra="")
    assert main(["tune", str(config), "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no search: section" in err[0]


def test_bad_search_spaces_fail_at_load(tmp_path, small_model_dir):
    from tunelab.errors import ConfigError

    bad = SEARCH.replace("{type: int, low: 2, high: 8}", "{type: int, low: 8, high: 2}")
    with pytest.raises(ConfigError, match="low"):
        load_spec(write_spec(tmp_path, small_model_dir, name="bad", extra=bad))
    typo = SEARCH.replace("method.options.r:", "method.options.rank:")
    spec = load_spec(write_spec(tmp_path, small_model_dir, name="typo", extra=typo))
    with pytest.raises(ConfigError, match="rank"):
        tune(spec, trials=1)
