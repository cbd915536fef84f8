"""Data-parallel training in two real processes (DDP on CPU, gloo) equals one process with the same global batch.

The worker (``_ddp_worker.py``) trains LoRA on a tiny random Llama with an objective that owns a
learned loss weight. One process with ``batch_size=4`` and two processes with ``batch_size=2`` each
see the same 4 records per step (``EpochSampler`` strides one global batch over the ranks), so:

- the logged loss curve (mean over ranks) equals the single-process curve within ``1e-5``;
- the trained adapter and the objective's learned weight equal within ``1e-5`` (fp32 summation order
  is the only difference: measured ~1e-7);
- evaluation runs on rank 0 only, and only rank 0 writes ``metrics.jsonl`` (no duplicated lines);
- SIGKILL of one rank stops the whole launch with a non-zero exit, and a rerun with ``resume``
  continues from the last checkpoint to the same adapter as an uninterrupted 2-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_ddp_worker.py")
TOLERANCE = 1e-5


def _launch(output_dir: Path, processes: int, *args: str) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(WORKER), str(output_dir), *args]
    else:  # --standalone: a local rendezvous on a free port
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(WORKER), str(output_dir), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (batch 4), two processes (batch 2 each), and two processes killed at step 6 — together."""
    root = tmp_path_factory.mktemp("ddp")
    started = {
        "one": _launch(root / "one", 1, "--batch-size", "4"),
        "two": _launch(root / "two", 2, "--batch-size", "2"),
        "killed": _launch(root / "killed", 2, "--batch-size", "2", "--kill-at", "6"),
    }
    outcome = {name: _wait(process) for name, process in started.items()}
    for name in ("one", "two"):
        assert outcome[name][0] == 0, outcome[name][1][-3000:]
    return root, outcome


def test_two_processes_equal_one(runs):
    root, _ = runs
    one, two = _metrics(root / "one"), _metrics(root / "two")
    assert [line["step"] for line in one] == [line["step"] for line in two]  # rank 1 wrote nothing
    for a, b in zip(one, two, strict=True):
        key = "loss" if "loss" in a else "eval_loss"
        assert b[key] == pytest.approx(a[key], abs=TOLERANCE), (a, b)
        if "loss" in a:
            assert b["sigma"] == pytest.approx(a["sigma"], abs=TOLERANCE)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=TOLERANCE)
    adapter_one, adapter_two = load_file(root / "one" / "trainable.safetensors"), load_file(root / "two" / "trainable.safetensors")
    assert adapter_one.keys() == adapter_two.keys()
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], atol=TOLERANCE, rtol=0)
    assert one[-2]["loss"] < one[0]["loss"]  # it trained (the last line is the final eval)


def test_objective_modules_and_evaluation_under_ddp(runs):
    root, _ = runs
    rank0, rank1 = (json.loads((root / "two" / f"rank-{r}.json").read_text()) for r in (0, 1))
    single = json.loads((root / "one" / "rank-0.json").read_text())
    assert rank0["sigma"] == rank1["sigma"] == pytest.approx(single["sigma"], abs=TOLERANCE)  # grads averaged
    assert rank0["sigma"] != pytest.approx(1.3498588800430298, abs=1e-3)  # exp(0.3): it did train
    assert rank0["eval_batches"] == single["eval_batches"] > 0
    assert rank1["eval_batches"] == 0  # evaluation is not duplicated


def test_killed_rank_stops_the_launch_and_resume_continues(runs):
    root, outcome = runs
    code, stderr = outcome["killed"]
    assert code != 0
    assert "SIGKILL" in stderr or "Signal 9" in stderr or "exitcode" in stderr, stderr[-2000:]
    state = json.loads((root / "killed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4  # save_every=4: the last checkpoint before the kill at step 6
    code, stderr = _wait(_launch(root / "killed", 2, "--batch-size", "2", "--resume"))
    assert code == 0, stderr[-3000:]
    resumed, uninterrupted = load_file(root / "killed" / "trainable.safetensors"), load_file(root / "two" / "trainable.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=TOLERANCE, rtol=0)
    losses = {line["step"]: line["loss"] for line in _metrics(root / "killed") if "loss" in line}
    reference = {line["step"]: line["loss"] for line in _metrics(root / "two") if "loss" in line}
    assert losses == pytest.approx(reference, abs=TOLERANCE)
