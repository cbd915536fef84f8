"""The quickstart's pipeline end to end on the real pretrained tiny-llama (short budget)."""

from __future__ import annotations

import json

import pytest

from tunelab.cli import packaged_config
from tunelab.experiments.runner import run_experiment
from tunelab.experiments.spec import load_spec


@pytest.mark.integration
def test_quickstart_pipeline_learns_the_medical_domain(pretrained_tiny_llama, tmp_path):
    """Full FT and LoRA (DoRA), on a short budget, must both beat the base model on held-out entities."""
    import torch

    from tunelab.eval import evaluate_records
    from tunelab.experiments.data import build_splits
    from tunelab.models import zoo

    spec = load_spec(packaged_config("quickstart"), [
        f"output_dir={tmp_path}", "train.max_steps=60", "data.train_size=200", "data.eval_size=0",
        "data.test_size=24", "train.eval_every=null", "eval.latency_batches=1",
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = run_experiment(spec, progress=False, isolate=False)
        _, _, test, _ = build_splits(spec.data)
        base, tokenizer = zoo.load("tiny-llama", progress=False)
        base_score = evaluate_records(base, tokenizer, test, max_new_tokens=24, progress=False)["score"]
    finally:
        torch.set_num_threads(threads)
    scores = {r["method_label"]: r["metrics"]["score"] for r in results}
    assert set(scores) == {"full", "dora"}
    assert scores["dora"] > base_score, (scores, base_score)
    assert scores["full"] > base_score, (scores, base_score)
    for result in results:  # both learnt: the training loss fell by at least a third
        losses = [h["loss"] for h in result["history"] if h.get("loss") is not None]
        assert losses[-1] < 0.67 * losses[0], (result["run_id"], losses)
    dora = next(r for r in results if r["method_label"] == "dora")
    full = next(r for r in results if r["method_label"] == "full")
    # DoRA trains LoRA's r * (d_in + d_out) plus a magnitude per output (d_out) per adapted linear layer
    # (all-linear: every linear but lm_head); r = 32 on a 3.4M-parameter model is ~18% of full fine-tuning.
    rank = next(m for m in spec.grid.methods if m.name == "dora").options["r"]
    expected = sum(rank * (m.in_features + m.out_features) + m.out_features for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    assert dora["trainable_parameters"] == expected, (dora["trainable_parameters"], expected)
    assert dora["trainable_parameters"] < 0.2 * full["trainable_parameters"]
    report = (tmp_path / "quickstart" / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 2  # loss curves, quality; Pareto plots too
    assert json.loads((tmp_path / "quickstart" / "results" / "dora-n200-s0.json").read_text())["history"]
