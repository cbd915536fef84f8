"""Every registered objective under DDP: two real processes (torchrun, gloo, CPU) against one, same global batch.

One launch of ``_ddp_objectives_worker.py`` per process count (2 and 1, started together; the start-up is
paid once per launch) trains every objective of ``registry.objectives()`` for 2 steps on a tiny random
model with its usual method and options (and a few variants: ``ppo--greedy``, ``distill--finetune``); the
worker writes one JSON per objective and rank, and the tests below only read them. For each objective:

- it runs under 2 processes (an objective without a case in the worker fails here, by name);
- both ranks hold bitwise identical trainable tensors after every step — the model's and the
  objective's own modules (heads, projectors, learned loss weights) — and identical objective state;
- the loss curve, the final rank-0 eval loss and the trained tensors equal the 1-process run within
  ``_ddp_objectives_worker.EXACT`` (1e-5) for the loss and ``PARAMS`` (1e-4) for the tensors; the
  exceptions are listed with their reason in ``TOLERANCES`` (KTO's per-process z0; PPO / GRPO sample
  their rollouts per process, so only ``ppo--greedy`` is compared);
- teachers and reference tensors (a distillation teacher, a fine-tuned teacher, DPO's frozen adapter
  copy, KTO's precomputed log-probs, LwF's snapshot) keep their storage and values from the first to
  the last step and no ``.to()`` is called on a teacher during training: placed once, not per step.
"""

from __future__ import annotations

import math
import subprocess

import _ddp_objectives_worker as worker
import pytest

from tunelab.experiments import registry

NAMES = [*registry.objectives(), *worker.VARIANTS]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("ddp-objectives")
    started = {}
    for processes in (2, 1):
        command, env = worker.launch_command(root / str(processes), processes)
        started[processes] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True)
    finished = {p: (*process.communicate(timeout=600), process.returncode) for p, process in started.items()}
    failed = {p: out for p, out in finished.items() if out[2] != 0}
    results = {name: worker.compare(root / "1", root / "2", name) for name in NAMES}
    if failed and not any(r["errors"] for r in results.values()):  # a crash the per-objective files do not explain
        pytest.fail("; ".join(f"{p}-process launch exited {out[2]}: {out[1][-2000:]}" for p, out in failed.items()))
    return results


@pytest.mark.parametrize("name", NAMES)
def test_objective_runs_under_ddp_like_one_process(results, name):
    result = results[name]
    assert not result["errors"], "\n".join(result["errors"])
    assert result["steps"] == [worker.STEPS] * 3, result["steps"]
    assert result["finite"], (result["losses_one"], result["losses_two"])
    # DDP keeps the ranks in sync: the model's and the objective's trainable tensors, after every step
    assert result["ranks_identical"], f"{name}: the two ranks hold different trainable tensors"
    assert result["state_identical"], f"{name}: the two ranks end with different objective state"
    assert result["same_names"]
    assert result["trained"] or name in worker.NO_OP, f"{name}: two steps changed no trainable tensor"
    loss_tolerance, reason = worker.tolerance(name)
    if loss_tolerance is not None:
        assert result["max_loss_diff"] <= loss_tolerance, (reason, result["losses_one"], result["losses_two"])
        assert result["eval_diff"] <= loss_tolerance, reason
        assert result["max_param_diff"] <= max(loss_tolerance, worker.PARAMS), worker.PARAMS_REASON
    assert not result["frozen_problems"], result["frozen_problems"]


def test_teachers_and_references_are_checked_where_the_objective_has_them(results):
    """The placement check is not vacuous: the objectives with a teacher or a frozen reference report one."""
    expected = {"distill": 1, "distill--finetune": 1, "distill_classification": 1, "dpo": 8, "lwf": 8, "domain_kd": 1}
    assert {name: results[name].get("frozen_items") for name in expected} == expected
    assert results["kto"].get("frozen_items", 0) >= 8  # the precomputed log-probs of the 8 training examples


def test_sampled_objectives_differ_only_by_their_samples(results):
    """PPO and GRPO are not compared with one process (their rollouts are sampled per process); PPO with
    greedy rollouts and no whitening is, and matches — so what differs is the sampling, not the update."""
    for name in ("ppo", "grpo"):
        assert worker.tolerance(name)[0] is None
        assert math.isfinite(results[name].get("max_loss_diff", math.nan))
    assert results["ppo--greedy"]["max_loss_diff"] <= worker.EXACT


def test_every_registered_objective_has_a_case():
    assert set(registry.objectives()) <= set(worker.CASES), sorted(set(registry.objectives()) - set(worker.CASES))
    assert not set(worker.VARIANTS) & set(registry.objectives())
