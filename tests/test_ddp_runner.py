"""``tunelab run --processes 2``: a cell trained by two DDP processes (torchrun, gloo) through the runner.

Rank 0 alone holds the run lock, evaluates and writes the result, adapter and report; the loss curve
follows the one-process run with the same global batch. Exact equality is the business of
``test_ddp.py`` (equal-length sequences); here summaries have different lengths, so each rank's
token-mean loss weights its tokens a little differently from the one-process mean over all tokens
(the same convention as DDP in HF Trainer): the curves agree within 1%, not 1e-5. A launch whose processes are SIGKILLed mid-cell stops with one
line (exit 1), and the rerun resumes the cell from its last checkpoint to the uninterrupted curve.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = ("name: exp\noutput_dir: {runs}\nmodel: {{name: '{model}'}}\n"
          "data: {{tasks: [summarization], domain: medical, train_size: 16, eval_size: 4, test_size: 4}}\n"
          "train: {{max_steps: 6, batch_size: {batch}, save_every: 3, log_every: 1, learning_rate: 0.01}}\n"
          "method: {{name: lora, options: {{r: 2, lora_dropout: 0.0, target_modules: [q_proj, v_proj]}}}}\n"
          "eval: {{max_new_tokens: 4, latency_batches: 0}}\n")


def _start(tmp_path: Path, model: Path, name: str, batch: int, *args: str, **env: str) -> subprocess.Popen:
    config = tmp_path / f"{name}.yaml"
    config.write_text(CONFIG.format(runs=tmp_path / name, model=model, batch=batch))
    return subprocess.Popen([sys.executable, "-m", "tunelab", "run", str(config), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def launched(tmp_path_factory, small_model_dir):
    """One process; two processes; two processes SIGKILLed at step 4 (checkpoint at 3) — all at once."""
    tmp_path = tmp_path_factory.mktemp("ddp-runner")
    processes = {"one": _start(tmp_path, small_model_dir, "one", 4, "--in-process"),
                 "two": _start(tmp_path, small_model_dir, "two", 2, "--processes", "2"),
                 "killed": _start(tmp_path, small_model_dir, "killed", 2, "--processes", "2",
                                  TUNELAB_KILL_AT_STEP="4")}
    outputs = {name: (*process.communicate(timeout=600), process.returncode) for name, process in processes.items()}
    return tmp_path, outputs


def test_run_with_two_processes_matches_one(launched):
    tmp_path, outputs = launched
    for name in ("one", "two"):
        assert outputs[name][2] == 0, outputs[name][1][-3000:]
    assert outputs["two"][0].count("Held-out results") == 1  # rank 1 printed no table
    results = sorted((tmp_path / "two" / "exp" / "results").glob("*.json"))
    assert [p.name for p in results] == ["lora-n16-s0.json"]
    assert (tmp_path / "two" / "exp" / "report.md").is_file()
    assert (tmp_path / "two" / "exp" / "adapters" / "lora-n16-s0").is_dir()
    assert not (tmp_path / "two" / "exp" / ".work" / "lora-n16-s0").exists()
    single, parallel = (json.loads((tmp_path / n / "exp" / "results" / "lora-n16-s0.json").read_text())
                        for n in ("one", "two"))
    assert [e["step"] for e in parallel["history"]] == [e["step"] for e in single["history"]]
    for a, b in zip(single["history"], parallel["history"], strict=True):
        key = "loss" if "loss" in a else "eval_loss"
        assert b[key] == pytest.approx(a[key], rel=0.01)
    assert parallel["final_eval_loss"] == pytest.approx(single["final_eval_loss"], rel=0.01)
    assert parallel["metrics"].keys() == single["metrics"].keys()


def test_a_killed_launch_is_one_line_and_a_rerun_resumes(launched, small_model_dir):
    tmp_path, outputs = launched
    _, stderr, code = outputs["killed"]
    assert code == 1
    assert stderr.strip().splitlines()[-1].startswith("error: a process of the 2-process launch failed or was killed")
    assert (tmp_path / "killed" / "exp" / ".work" / "lora-n16-s0" / "train" / "checkpoint").is_dir()
    rerun = _start(tmp_path, small_model_dir, "killed", 2, "--processes", "2")
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert "resuming" in out
    resumed, uninterrupted = (json.loads((tmp_path / n / "exp" / "results" / "lora-n16-s0.json").read_text())
                              for n in ("killed", "two"))
    assert [e["step"] for e in resumed["history"]] == [e["step"] for e in uninterrupted["history"]]
    for a, b in zip(uninterrupted["history"], resumed["history"], strict=True):
        key = "loss" if "loss" in a else "eval_loss"
        assert b[key] == pytest.approx(a[key], abs=1e-5)


STAGED = ("name: staged\noutput_dir: {runs}\nmodel: {{name: '{model}'}}\n"
          "method: {{name: lora, options: {{r: 2, lora_dropout: 0.0, target_modules: all-linear}}}}\n"
          "data: {{tasks: [summarization], domain: medical, train_size: 8, eval_size: 2, test_size: 2, max_length: 96}}\n"
          "train: {{max_steps: 2, batch_size: 2, eval_every: 1, log_every: 1}}\n"
          "eval: {{max_new_tokens: 2, latency_batches: 0}}\n"
          "stages:\n"
          "  - {{name: multitask, data: {{tasks: [qa, domain_classification]}}, objective: {{name: multitask, options: "
          "{{tasks: [{{name: qa}}, {{name: domain, match: {{task: domain_classification}}}}], sharing: per_task, "
          "switching: example}}}}}}\n"
          "  - {{name: distill, objective: {{name: distill, options: {{teacher: {{model: '{model}'}}, "
          "loss: forward_kl, temperature: 2.0, alpha: 0.5}}}}}}\n"
          "  - {{name: dpo, data: {{tasks: [preference]}}, objective: {{name: dpo, options: {{reference: sft_adapter, beta: 0.1}}}}}}\n")


def test_objectives_with_heads_teachers_and_references_run_under_ddp(tmp_path, small_model_dir):
    """Multi-task (per-task adapters routed per example, task heads), distillation (a teacher placed on
    each process's device) and DPO (a frozen snapshot of the adapter as reference), as stages of one
    2-process cell."""
    config = tmp_path / "staged.yaml"
    config.write_text(STAGED.format(runs=tmp_path / "runs", model=small_model_dir))
    process = subprocess.run([sys.executable, "-m", "tunelab", "run", str(config), "--processes", "2"],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(next((tmp_path / "runs" / "staged" / "results").glob("*.json")).read_text())
    assert [s["name"] for s in result["stages"]] == ["multitask", "distill", "dpo"]
    assert all(s["steps"] == 2 for s in result["stages"])
    assert len(result["stage_matrix"]["scores"]) == 3


def test_a_rank_s_user_error_is_one_line(tmp_path, small_model_dir):
    """A mistake found inside the launched processes (DPO against the base after an earlier stage trained
    the adapter) comes back as that process's one-line error, exit code 2."""
    config = tmp_path / "staged.yaml"
    config.write_text(STAGED.format(runs=tmp_path / "runs", model=small_model_dir)
                      .replace("reference: sft_adapter", "reference: base"))
    process = subprocess.run([sys.executable, "-m", "tunelab", "run", str(config), "--processes", "2"],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith("error: dpo: at step 0 the policy differs")
