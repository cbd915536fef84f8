"""The CLI: one-line errors with exit code 2, no tracebacks, and run directories never half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli import main

CAPTURE = None  # the current test's capsys, set by the autouse fixture


@pytest.fixture(autouse=True)
def _capsys(capsys):
    global CAPTURE
    CAPTURE = capsys
    yield


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Call the CLI in this process (fast); ``main`` is exactly what the console script runs."""
    CAPTURE.readouterr()
    code = main(list(args))
    out, err = CAPTURE.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def run_cli_process(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True)


def assert_one_line_error(completed: subprocess.CompletedProcess, *fragments: str) -> None:
    assert completed.returncode == 2, completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in completed.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_config(tmp_path: Path, model_dir: Path, extra: str = "", name: str = "exp") -> Path:
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"name: {name}\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: '{model_dir}'}}\n"
        "data: {tasks: [summarization], domain: medical, train_size: 16, eval_size: 0, test_size: 4}\n"
        "train: {max_steps: 2, batch_size: 4, eval_every: null, save_every: null}\n"
        "eval: {max_new_tokens: 4, latency_batches: 1}\n" + extra
    )
    return config


def test_methods_lists_full_and_lora(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out.split()
    assert "full" in out and "lora" in out


def test_missing_config_in_a_real_process(tmp_path):
    assert_one_line_error(run_cli_process("run", str(tmp_path / "missing.yaml")), "config file not found")


def test_unknown_yaml_key(tmp_path, small_model_dir):
    config = write_config(tmp_path, small_model_dir, "bogus_section: 1\n")
    assert_one_line_error(run_cli("run", str(config)), "bogus_section", "unknown key")


def test_unknown_method(tmp_path, small_model_dir):
    config = write_config(tmp_path, small_model_dir, "method: {name: lorax}\n")
    assert_one_line_error(run_cli("run", str(config)), "lorax", "lora")


def test_unknown_method_option(tmp_path, small_model_dir):
    config = write_config(tmp_path, small_model_dir, "method: {name: lora, options: {rank: 4}}\n")
    assert_one_line_error(run_cli("run", str(config)), "rank")


def test_nonpositive_rank(tmp_path, small_model_dir):
    config = write_config(tmp_path, small_model_dir, "method: {name: lora, options: {r: 0}}\n")
    assert_one_line_error(run_cli("run", str(config)), "r")


def test_targets_that_match_nothing_list_the_modules(tmp_path, small_model_dir):
    config = write_config(tmp_path, small_model_dir, "method: {name: lora, options: {target_modules: [qq_proj]}}\n")
    assert_one_line_error(run_cli("run", str(config)), "qq_proj", "q_proj")


def test_missing_model_path(tmp_path, small_model_dir):
    config = write_config(tmp_path, tmp_path / "no-model")
    assert_one_line_error(run_cli("run", str(config)), "no-model")


def test_malformed_data_row_names_file_and_line(tmp_path, small_model_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": "x"\n')
    config = write_config(tmp_path, small_model_dir, "\n")
    text = config.read_text().replace("data: {tasks: [summarization], domain: medical,",
                                      f"data: {{source: '{data}', format: jsonl,")
    config.write_text(text)
    completed = run_cli("run", str(config))
    assert_one_line_error(completed, "rows.jsonl", "3")


def test_bad_override(tmp_path, small_model_dir):
    config = write_config(tmp_path, small_model_dir)
    assert_one_line_error(run_cli("run", str(config), "train.max_steps=-1"), "train.max_steps")


def test_failed_run_leaves_existing_run_directory_untouched(tmp_path, small_model_dir):
    run_dir = tmp_path / "runs" / "exp"
    (run_dir / "results").mkdir(parents=True)
    sentinel = run_dir / "results" / "old.json"
    sentinel.write_text(json.dumps({"keep": True}))
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    config = write_config(tmp_path, small_model_dir, "method: {name: lora, options: {target_modules: [nope]}}\n")
    assert_one_line_error(run_cli("run", str(config)), "nope")
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    assert json.loads(sentinel.read_text()) == {"keep": True}


def test_failed_first_run_creates_nothing(tmp_path, small_model_dir):
    config = write_config(tmp_path, small_model_dir, "method: {name: lora, options: {r: -3}}\n")
    assert_one_line_error(run_cli("run", str(config)), "r")
    assert not (tmp_path / "runs" / "exp").exists()


def test_report_on_missing_run(tmp_path):
    assert_one_line_error(run_cli("report", str(tmp_path / "nothing")), "no results")


@pytest.mark.integration
def test_run_report_and_skip_on_rerun(tmp_path, small_model_dir):
    extra = ("grid:\n  methods:\n    - {name: full}\n    - {name: lora, options: {r: 4, target_modules: all-linear}}\n")
    config = write_config(tmp_path, small_model_dir, extra)
    completed = run_cli_process("run", str(config), "--in-process")
    assert completed.returncode == 0, completed.stderr
    run_dir = tmp_path / "runs" / "exp"
    results = sorted((run_dir / "results").glob("*.json"))
    assert [p.stem for p in results] == ["full-n16-s0", "lora-n16-s0"]
    record = json.loads(results[1].read_text())
    for key in ("metrics", "trainable_parameters", "peak_memory_mb", "train_tokens_per_second",
                "inference_latency_ms", "versions", "history", "config"):
        assert key in record
    assert 0 < record["trainable_parameters"] < json.loads(results[0].read_text())["trainable_parameters"]
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "lora" in html
    assert (run_dir / "report.md").read_text().count("|") > 10
    assert not (run_dir / ".work").exists() or not any((run_dir / ".work").iterdir())
    # Rerun: finished cells are skipped, results untouched.
    stamp = results[1].stat().st_mtime_ns
    completed = run_cli("run", str(config), "--in-process")
    assert completed.returncode == 0 and "skipped" in completed.stdout
    assert results[1].stat().st_mtime_ns == stamp
    (run_dir / "report.md").unlink()
    assert run_cli("report", str(run_dir)).returncode == 0
    assert (run_dir / "report.md").exists()


def test_generate_with_and_without_an_adapter(tmp_path, small_model_dir):
    from tunelab import tuners
    from tunelab.models import zoo

    completed = run_cli("generate", "Summarize the note: hello", "--model", str(small_model_dir), "--max-new-tokens", "4")
    assert completed.returncode == 0, completed.stderr
    assert "Summarize the note: hello" in completed.stdout
    model, _ = zoo.load(str(small_model_dir))
    tuners.apply(model, "lora", r=2, target_modules="all-linear")
    tuners.save(model, tmp_path / "adapter", format="peft")
    completed = run_cli("generate", "hi", "--model", str(small_model_dir), "--adapter", str(tmp_path / "adapter"))
    assert completed.returncode == 0, completed.stderr
    assert_one_line_error(run_cli("generate", "hi", "--model", str(small_model_dir), "--adapter",
                                  str(tmp_path / "missing")), "adapter directory not found")
