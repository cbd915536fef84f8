"""Exact resume and atomic checkpoints of tunelab.train.

The main test kills a training subprocess with SIGKILL between two checkpoints, resumes it in a new
process, and requires the final trainable weights to equal, bit for bit, those of a run that was never
interrupted (tiny random Llama with attention dropout, gradient accumulation, clipping, weight decay,
periodic eval, epochs rolling over mid-run).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tunelab.errors import ConfigError
from tunelab.train import TrainConfig, train
from tunelab.train import checkpoint as ckpt

WORKER = Path(__file__).with_name("_resume_worker.py")
TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


def _worker(output_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(output_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]


def _without_timing(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def processes():
    """Subprocesses started by a test; any still running at its end (a failure) are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("variant", [[], ["--seam"]], ids=["collate-fn", "objective-module-and-group-sampler"])
def test_sigkilled_run_resumes_to_bitwise_identical_weights(tmp_path, processes, variant):
    straight, killed, go = tmp_path / "straight", tmp_path / "killed", tmp_path / "go"
    uninterrupted = _worker(straight, *variant)  # runs alongside the one we kill
    victim = _worker(killed, "--pause-at", "12", *variant)
    resumer = _worker(killed, "--resume", "--wait-for", str(go), *variant)  # a new process; waits for the kill
    processes += [uninterrupted, victim, resumer]
    deadline = time.monotonic() + 300
    while not (killed / "paused").exists():
        if victim.poll() is not None:
            pytest.fail(f"worker exited before pausing: {victim.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("worker did not reach step 12")
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert json.loads((killed / "checkpoint" / "state.json").read_text())["step"] == 10
    assert max(line["step"] for line in _metrics(killed)) == 12  # steps 11-12 logged, then lost
    assert not (killed / "trainable.safetensors").exists()

    assert resumer.poll() is None  # still waiting: it has not touched the run directory
    go.touch()
    _finish(resumer)
    _finish(uninterrupted)

    expected = load_file(str(straight / "trainable.safetensors"))
    resumed = load_file(str(killed / "trainable.safetensors"))
    assert set(resumed) == set(expected) and "model.embed_tokens.weight" not in resumed
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    initial = _load_worker().build_model().state_dict()
    assert not torch.equal(expected["lm_head.weight"], initial["lm_head.weight"])  # it did train
    # the metrics log reads as one run: same steps, losses, lrs, grad norms and eval losses
    assert _without_timing(_metrics(killed)) == _without_timing(_metrics(straight))
    assert sum("eval_loss" in line for line in _metrics(killed)) == 4
    if variant:  # the objective's module trained, was checkpointed and resumed; its state and metrics too
        final_straight = ckpt.load_checkpoint(straight)
        final_killed = ckpt.load_checkpoint(killed)
        assert torch.equal(final_killed.trainable["objective.0.log_sigma"], final_straight.trainable["objective.0.log_sigma"])
        assert float(final_straight.trainable["objective.0.log_sigma"]) != pytest.approx(0.3)
        assert final_killed.objective["calls"] == final_straight.objective["calls"] == 40 * 2
        assert torch.equal(final_killed.objective["running"], final_straight.objective["running"])
        assert final_killed.state["data"] == final_straight.state["data"] and "groups" in final_killed.state["data"]
        assert all("nll" in line and "sigma" in line for line in _metrics(killed) if "loss" in line)


def _load_worker():
    spec = importlib.util.spec_from_file_location("_resume_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- in-process resume
class Noisy(nn.Module):
    """A linear regressor with dropout, so that resuming depends on the RNG state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return type("Out", (), {"loss": ((self.linear(self.dropout(x)) - y) ** 2).mean()})()


RECORDS = [{"x": [float(i % 3), 1.0, -float(i % 5), 0.5], "y": [float(i % 7)]} for i in range(20)]


def collate(records):
    return {"x": torch.tensor([r["x"] for r in records]), "y": torch.tensor([r["y"] for r in records])}


CONFIG = TrainConfig(max_steps=9, batch_size=3, grad_accum=2, save_every=2, log_every=1, learning_rate=0.05)


def test_resume_without_checkpoint_starts_fresh_and_finished_runs_stay_finished(tmp_path, caplog):
    reference = Noisy()
    train(reference, RECORDS, collate, CONFIG, progress=False)
    model = Noisy()
    with caplog.at_level(logging.INFO, logger="tunelab.train.loop"):
        result = train(model, RECORDS, collate, CONFIG, output_dir=tmp_path, resume=True, progress=False)
    assert "starting fresh" in caplog.text
    assert torch.equal(model.linear.weight, reference.linear.weight)
    again = Noisy()
    repeat = train(again, RECORDS, collate, CONFIG, output_dir=tmp_path, resume=True, progress=False)
    assert repeat.steps == 9 and repeat.history == result.history  # nothing left to do
    assert torch.equal(again.linear.weight, reference.linear.weight)  # weights come from the checkpoint


def test_stopped_run_resumes_exactly_in_process(tmp_path):
    reference = Noisy()
    expected = train(reference, RECORDS, collate, CONFIG, progress=False)
    stop_at_5 = [lambda record: record["step"] == 5]
    first = train(Noisy(), RECORDS, collate, CONFIG, output_dir=tmp_path, callbacks=stop_at_5, progress=False)
    assert first.steps == 5 and first.stopped_early
    model = Noisy()
    result = train(model, RECORDS, collate, CONFIG, output_dir=tmp_path, resume=True, progress=False)
    assert torch.equal(model.linear.weight, reference.linear.weight)
    assert torch.equal(model.linear.bias, reference.linear.bias)
    assert _without_timing(result.history) == _without_timing(expected.history)


def test_fresh_run_replaces_an_old_checkpoint_and_mismatched_models_are_refused(tmp_path):
    train(Noisy(), RECORDS, collate, CONFIG, output_dir=tmp_path, progress=False)
    short = CONFIG.model_copy(update={"max_steps": 2, "save_every": None})
    train(Noisy(), RECORDS, collate, short, output_dir=tmp_path, progress=False)
    assert ckpt.load_checkpoint(tmp_path).step == 2
    assert [line["step"] for line in _metrics(tmp_path)] == [1, 2]
    other = Noisy()
    other.linear.bias.requires_grad_(False)
    with pytest.raises(ConfigError, match="trainable parameters"):
        train(other, RECORDS, collate, CONFIG, output_dir=tmp_path, resume=True, progress=False)


# ----------------------------------------------------------------------------- atomic checkpoints
def _save(output_dir: Path, step: int) -> None:
    ckpt.save_checkpoint(
        output_dir,
        trainable={"w": torch.full((2,), float(step))},
        optimizer_state={"state": {}, "param_groups": []},
        scheduler_state={"last_epoch": step},
        state={"step": step},
    )


def test_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # dies after trainable.safetensors is written
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert (tmp_path / ckpt.TMP_NAME).is_dir()  # the half-written attempt
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.step == 1 and torch.equal(loaded.trainable["w"], torch.ones(2))
    _save(tmp_path, 3)
    assert ckpt.load_checkpoint(tmp_path).step == 3 and not (tmp_path / ckpt.TMP_NAME).exists()


def test_crash_between_renames_falls_back_to_the_old_checkpoint(tmp_path):
    _save(tmp_path, 4)
    os.replace(tmp_path / ckpt.CHECKPOINT_NAME, tmp_path / ckpt.OLD_NAME)  # as if killed mid-swap
    assert ckpt.load_checkpoint(tmp_path).step == 4
    _save(tmp_path, 5)
    assert ckpt.load_checkpoint(tmp_path).step == 5 and not (tmp_path / ckpt.OLD_NAME).exists()
    assert ckpt.load_checkpoint(tmp_path / "nowhere") is None


def test_rng_states_round_trip():
    state = ckpt.capture_rng_state()
    json.dumps({"python": state["python"], "numpy": state["numpy"]})  # JSON-able
    draws = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_metrics_log_drops_lines_after_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo'
    )
    log = ckpt.MetricsLog(path)
    log.restart(keep_through_step=2)
    assert log.records == [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}]
    log.append({"step": 3, "loss": 0.5})
    assert _metrics(tmp_path) == log.records
    log.restart(keep_through_step=None)
    assert path.read_text() == ""
