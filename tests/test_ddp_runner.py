"""``tunelab run --processes 2``: a cell trained by two DDP processes (torchrun, gloo) through the runner.

Rank 0 alone holds the run lock, evaluates and writes the result, adapter and report; the loss curve
follows the one-process run with the same global batch. Exact equality is the business of
``test_ddp.py`` (equal-length sequences); here summaries have different lengths, so each rank's
token-mean loss weights its tokens a little differently from the one-process mean over all tokens
(the same convention as DDP in HF Trainer): the curves agree within 1%, not 1e-5.
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


def _start(tmp_path: Path, model: Path, name: str, batch: int, *args: str) -> subprocess.Popen:
    config = tmp_path / f"{name}.yaml"
    config.write_text(CONFIG.format(runs=tmp_path / name, model=model, batch=batch))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tunelab", "run", str(config), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_run_with_two_processes_matches_one(tmp_path, small_model_dir):
    one = _start(tmp_path, small_model_dir, "one", 4, "--in-process")
    two = _start(tmp_path, small_model_dir, "two", 2, "--processes", "2")
    outputs = {name: process.communicate(timeout=300) for name, process in (("one", one), ("two", two))}
    for name, process in (("one", one), ("two", two)):
        assert process.returncode == 0, outputs[name][1][-3000:]
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
