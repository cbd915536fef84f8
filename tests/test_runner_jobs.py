"""Issue 15 item 2 and issue 17 item 3: `tunelab run --jobs N` runs grid cells in parallel subprocesses, and a
cell that fails is recorded and reported while the other cells finish."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from process_helpers import cell_processes
from process_helpers import cli as _cli
from rich.console import Console

from tunelab.experiments import jobs

# Two LoRA cells. With lora_alpha 1e20, learning rate 1 and no gradient clipping the second cell diverges:
# "training loss became nan at step 3" -- a user-facing error that preflight cannot see. (An alpha of
# 1e30 no longer does: its squared gradient overflows AdamW's second moment to inf, so the first update
# is 0 and the loss stays finite.)
CONFIG = ("name: exp\noutput_dir: {runs}\nmodel: {{name: '{model}'}}\n"
          "data: {{tasks: [summarization], domain: medical, train_size: 16, eval_size: 0, test_size: 4}}\n"
          "train: {{max_steps: {steps}, batch_size: 4, log_every: 1, save_every: {save_every}}}\n"
          "eval: {{max_new_tokens: 4, latency_batches: 0}}\n"
          "grid:\n  methods:\n"
          "    - {{name: lora, options: {{r: 2, target_modules: [q_proj, v_proj]}}}}\n"
          "    - {{name: lora, label: second, options: {{r: 2, lora_alpha: {alpha}, target_modules: [q_proj, v_proj]}}, "
          "train: {{learning_rate: {lr}, max_grad_norm: null}}}}\n")


DIVERGING = {"alpha": "1.0e+20", "lr": "1.0"}  # the second cell's settings that diverge


def _config(tmp: Path, model: Path, runs: str = "runs", alpha: str = "16.0", steps: int = 3,
            save_every: str = "null", lr: str = "1.0e-3") -> Path:
    path = tmp / f"exp-{runs}.yaml"
    path.write_text(CONFIG.format(runs=tmp / runs, model=model, alpha=alpha, steps=steps, save_every=save_every,
                                  lr=lr))
    return path


def test_two_jobs_give_the_results_of_one(tmp_path, small_model_dir, monkeypatch):
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import load_spec

    # the cells one after the other (in this process, on one thread like the tests' torch: cheaper than
    # two more subprocesses), then two at once in subprocesses of one thread each, whichever the machine
    monkeypatch.setattr(jobs, "cpus", lambda: 2)
    one = run_experiment(load_spec(_config(tmp_path, small_model_dir, "one")), progress=False, isolate=False)
    output = io.StringIO()
    two = run_experiment(load_spec(_config(tmp_path, small_model_dir, "two")), progress=False, jobs=2,
                         console=Console(file=output, width=200))
    assert [r["run_id"] for r in two] == [r["run_id"] for r in one] == ["lora-n16-s0", "second-n16-s0"]
    for first, second in zip(one, two, strict=True):
        assert second["cell_key"] == first["cell_key"]
        assert second["metrics"] == first["metrics"]
        assert [h.get("loss") for h in second["history"]] == [h.get("loss") for h in first["history"]]
        assert second["trainable_parameters"] == first["trainable_parameters"]
        assert (tmp_path / "two" / "exp" / "results" / f"{second['run_id']}.json").is_file()
    lines = output.getvalue().splitlines()
    assert lines[0] == "running up to 2 cells at once, 1 thread(s) each"
    for index, run_id in ((1, "lora-n16-s0"), (2, "second-n16-s0")):  # one line as it starts, one as it ends
        assert f"[{index}/2] {run_id}: training lora" in lines
        assert any(line.startswith(f"[{index}/2] {run_id}: score ") for line in lines)
    assert (tmp_path / "two" / "exp" / "report.md").is_file() and not (tmp_path / "two" / "exp" / "failed").exists()


def test_a_failing_cell_is_recorded_reported_and_retried(tmp_path, small_model_dir, capsys):
    config = _config(tmp_path, small_model_dir, **DIVERGING)
    run_dir = tmp_path / "runs" / "exp"
    code, out, err = _cli(capsys, "run", str(config), "--jobs", "2")
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("error: 1 of 2 cells failed (second-n16-s0: ConfigError: training loss became nan")
    assert "[2/2] second-n16-s0: failed: ConfigError: training loss became nan" in out
    assert (run_dir / "results" / "lora-n16-s0.json").is_file()  # the other cell finished
    assert not (run_dir / "results" / "second-n16-s0.json").exists()
    record = json.loads((run_dir / "failed" / "second-n16-s0.json").read_text())
    assert record["error_type"] == "ConfigError" and record["exit_code"] == 2
    assert record["message"].startswith("training loss became nan at step 3") and "\n" not in record["message"]
    assert "training loss became nan" in (run_dir / record["log"]).read_text()
    report = (run_dir / "report.md").read_text()
    assert "1 run(s), 1 failed" in report
    assert "## Failed cells" in report and "| second-n16-s0 | ConfigError: training loss became nan" in report
    assert "<h2>Failed cells</h2>" in (run_dir / "report.html").read_text()

    finished = (run_dir / "results" / "lora-n16-s0.json").stat().st_mtime_ns
    config.write_text(config.read_text().replace("lora_alpha: 1.0e+20", "lora_alpha: 16.0")
                      .replace("learning_rate: 1.0,", "learning_rate: 1.0e-3,"))  # the fix
    code, out, err = _cli(capsys, "run", str(config), "--in-process")  # in this process: the test's cheaper
    assert code == 0, err
    assert "[1/2] lora-n16-s0: done already, skipped" in out and "[2/2] second-n16-s0: " in out
    assert (run_dir / "results" / "lora-n16-s0.json").stat().st_mtime_ns == finished  # not run again
    assert (run_dir / "results" / "second-n16-s0.json").is_file()
    assert not any((run_dir / "failed").iterdir())  # the record and its log went with the success
    assert "Failed cells" not in (run_dir / "report.md").read_text()


def test_a_failure_in_process_is_recorded_with_its_traceback(tmp_path, small_model_dir):
    from tunelab.experiments.jobs import CellsFailed
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import load_spec

    config = _config(tmp_path, small_model_dir, **DIVERGING)
    config.write_text(config.read_text().replace("    - {name: lora, options: {r: 2, target_modules: [q_proj, v_proj]}}\n", ""))
    with pytest.raises(CellsFailed, match=r"^1 of 1 cells failed \(second-n16-s0: ConfigError: training loss") as caught:
        run_experiment(load_spec(config), progress=False, isolate=False)
    assert caught.value.results == [] and caught.value.exit_code == 1
    run_dir = tmp_path / "runs" / "exp"
    assert "Traceback" in (run_dir / "failed" / "second-n16-s0.log").read_text()
    report = (run_dir / "report.md").read_text()  # no cell finished: the report lists the failure alone
    assert "No cell finished." in report and "second-n16-s0" in report


@pytest.mark.parametrize("other", [["--in-process"], ["--processes", "2"]], ids=["in-process", "processes"])
def test_jobs_with_in_process_or_processes_is_a_one_line_error(tmp_path, capsys, other):
    code, out, err = _cli(capsys, "run", str(tmp_path / "exp.yaml"), "--jobs", "2", *other)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --jobs ") and other[0] in err, err
    assert not list(tmp_path.iterdir())


def test_the_pool_runs_n_children_at_once_and_an_interrupt_stops_them_all(monkeypatch):
    monkeypatch.setattr(jobs, "cpus", lambda: 16)
    assert jobs.thread_env(2)["OMP_NUM_THREADS"] == "8" and jobs.thread_env(32)["OMP_NUM_THREADS"] == "1"
    lock, running, peak = threading.Lock(), [0], [0]

    def sleeper(item, popen):
        process = popen(["sleep", "0.3"])
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        process.wait()
        with lock:
            running[0] -= 1
        return item * 10

    done: dict[int, int] = {}
    jobs.run(range(5), 2, sleeper, done.__setitem__)
    assert done == {i: i * 10 for i in range(5)} and peak[0] == 2

    started: list[subprocess.Popen] = []

    def interrupted(item, popen):
        if item == 0:  # a cell whose child exited 130: Ctrl-C
            time.sleep(0.5)
            raise KeyboardInterrupt
        started.append(popen(["sleep", "60"]))
        return started[-1].wait()

    begin = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        jobs.run(range(4), 2, interrupted, lambda item, outcome: None)
    assert time.monotonic() - begin < 10
    assert len(started) == 1 and started[0].returncode == -signal.SIGINT  # items 2 and 3 never started


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_every_cell_at_once_and_records_no_failure(tmp_path, small_model_dir):
    config = _config(tmp_path, small_model_dir, steps=100000)
    run_dir = tmp_path / "runs" / "exp"
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "run", str(config), "--jobs", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        started = [run_dir / ".work" / cell / "key" for cell in ("lora-n16-s0", "second-n16-s0")]
        while not all(path.exists() for path in started):  # both cells run at the same time
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the cells never both started"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: interrupted") and "--resume" in lines[-1] and "Traceback" not in err
    assert not cell_processes(run_dir)
    assert not (run_dir / "failed").exists() and not list((run_dir / "results").glob("*.json"))
    assert all(path.exists() for path in started)  # their scratch state is kept for the rerun
