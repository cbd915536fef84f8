"""The reward-vs-KL frontier: the held-out KL to the reference, the report section, the shipped config.

``kl_ref`` (tunelab.align.kl) is checked against a hand computation: separate unpadded forwards of the
policy and of the base model (adapter disabled) at every completion position of the policy's own
samples, KL = Σ_v p (log p − log q) summed over positions. DPO, KTO and PPO report the same number
on the same prompts, so their cells share one axis. The report section is built from fabricated
result files; the shipped config ``alignment_frontier.yaml`` resolves into the cells it promises.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pytest
import test_align  # the shared tiny LoRA model (tests/ is on sys.path, as for _ddp_objective_cases)
import torch
import yaml

from tunelab import tuners
from tunelab.align import report as align_report
from tunelab.align.kl import sequence_kl, token_kl
from tunelab.align.reference import Reference
from tunelab.align.rollout import sample
from tunelab.data import synthetic
from tunelab.eval.generate import encode_prompt
from tunelab.eval.tasks import render
from tunelab.experiments import registry
from tunelab.experiments.plots import ci95
from tunelab.models import tiny

CONFIGS = Path(str(resources.files("tunelab") / "configs"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tokenizer(synthetic.corpus(domains=("medical",), n_documents=200, seed=0), 400)


@pytest.fixture(scope="module")
def pairs():
    return synthetic.make_task("preference", domain="medical", split="test", n=4, seed=0)


def lora_model(tokenizer, trained: bool = True):
    """test_align's tiny random Llama with LoRA; here B is randomised by default, so that π differs from the base."""
    return test_align.lora_model(tokenizer, trained)


def test_token_kl_is_the_exact_per_token_kl_summed_over_the_mask():
    torch.manual_seed(0)
    policy, reference = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = []
    for n in range(2):
        total = 0.0
        for s in range(3):
            if not mask[n, s]:
                continue
            p = [math.exp(v) for v in policy[n, s].tolist()]
            q = [math.exp(v) for v in reference[n, s].tolist()]
            p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
            total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True))
        expected.append(total)
    assert token_kl(policy, reference, mask).tolist() == pytest.approx(expected, abs=1e-6)
    assert float(token_kl(policy, policy).abs().max()) < 1e-6  # KL(p ‖ p) = 0


def test_heldout_kl_equals_a_hand_computation_on_the_policys_own_samples(tokenizer, pairs):
    model = lora_model(tokenizer).eval()
    prompts = [render(r, "plain", tokenizer) for r in pairs]
    state = torch.get_rng_state()
    values = sequence_kl(model, tokenizer, prompts, Reference("base"), max_new_tokens=5, batch_size=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the training random state is left alone
    with torch.random.fork_rng():  # the same draws: seed 3, one batch
        torch.manual_seed(3)
        rollout = sample(model, tokenizer, prompts, max_new_tokens=5, temperature=1.0)
    expected = []
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            ids = encode_prompt(tokenizer, prompt)
            completion = rollout.sequences[row, rollout.prompt_length:][rollout.completion_mask[row].bool()].tolist()
            total = 0.0
            for t in range(len(completion)):
                context = torch.tensor([ids + completion[:t]])
                log_p = torch.log_softmax(model(input_ids=context).logits[0, -1], -1)
                with tuners.disabled(model):
                    log_q = torch.log_softmax(model(input_ids=context).logits[0, -1], -1)
                total += float((log_p.exp() * (log_p - log_q)).sum())
            expected.append(total)
    assert values.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert all(v > 0 for v in expected)
    fresh = lora_model(tokenizer, trained=False)  # B = 0: the policy is the reference
    assert sequence_kl(fresh, tokenizer, prompts, Reference("base"), max_new_tokens=5).abs().max() < 1e-6


def _objective(name, tokenizer, **options):
    objective = registry.build_objective(name, options)
    objective.collator(tokenizer, None, max_length=96, template="plain")
    return objective


def test_dpo_kto_and_ppo_report_the_same_kl_on_the_same_prompts(tokenizer, pairs):
    model = lora_model(tokenizer)
    accelerator = type("Accelerator", (), {"device": torch.device("cpu")})()
    metrics = {}
    for name in ("dpo", "kto", "ppo"):
        objective = _objective(name, tokenizer, reference="base")
        objective.setup(model, accelerator)
        metrics[name] = objective.evaluate(model, pairs, max_new_tokens=5, batch_size=4)
    assert metrics["dpo"]["kl_ref"] > 0
    assert metrics["kto"]["kl_ref"] == pytest.approx(metrics["dpo"]["kl_ref"], abs=1e-6)
    assert metrics["ppo"]["kl_ref"] == pytest.approx(metrics["dpo"]["kl_ref"], abs=1e-6)
    assert "generation_exact_match" in metrics["dpo"] and "exact_match" in metrics["ppo"]
    # no reference ready (sft_adapter before setup: the untuned baseline), or eval_kl off: no kl_ref
    assert "kl_ref" not in _objective("dpo", tokenizer, reference="sft_adapter").evaluate(model, pairs[:2],
                                                                                          max_new_tokens=3)
    assert "kl_ref" not in _objective("grpo", tokenizer, reference="sft_adapter", max_new_tokens=3).evaluate(
        model, pairs[:2], max_new_tokens=3)
    off = _objective("dpo", tokenizer, reference="base", eval_kl=False, eval_generation=False)
    off.setup(model, accelerator)
    assert "kl_ref" not in off.evaluate(model, pairs[:2], max_new_tokens=3)


# ----------------------------------------------------------------------------------------------- the report
SFT_STAGE = {"name": "sft", "objective": {"name": "sft", "options": {}}, "method": None, "data": {}, "train": {}}
BASE_FIELDS = {"experiment": "frontier", "method": "lora", "model": "tiny-llama", "train_size": 400,
               "trainable_parameters": 1000, "trainable_percent": 1.0, "train_seconds": 10.0,
               "train_tokens_per_second": 100.0, "peak_memory_mb": 500.0, "inference_latency_ms": None,
               "history": [{"step": 1, "loss": 1.0, "stage": "sft"}, {"step": 2, "loss": 0.5, "stage": "align"}]}


def fake_result(label: str, seed: int, objective: str, options: dict, reward: float, kl: float) -> dict:
    """A two-stage (sft -> align) result as the runner writes it, with the align stage's metrics."""
    key = "generation_exact_match" if objective in ("dpo", "kto") else "exact_match"
    align = {key: reward, "kl_ref": kl, "score": reward if key == "exact_match" else 0.5}
    sft = {"score": 0.3}
    return {**BASE_FIELDS, "run_id": f"{label}-n400-s{seed}", "method_label": label, "seed": seed,
            "objective": objective, "metrics": align,
            "config": {"objective": {"name": objective, "options": options},
                       "stages": [SFT_STAGE, {**SFT_STAGE, "name": "align", "objective": None}]},
            "stages": [{"name": "sft", "objective": "sft", "metrics": sft},
                       {"name": "align", "objective": objective, "metrics": align}],
            "stage_matrix": {"stages": ["sft", "align"], "scores": [[0.3, None], [0.29, align["score"]]]}}


#          label, objective, options, (reward, KL) for seeds 0 and 1
CELLS = [("dpo-b0.03", "dpo", {"beta": 0.03}, [(0.30, 4.0), (0.34, 4.4)]),
         ("dpo-b0.1", "dpo", {"beta": 0.1}, [(0.32, 2.0), (0.30, 2.2)]),
         ("dpo-b1", "dpo", {"beta": 1.0}, [(0.20, 0.5), (0.22, 0.7)]),
         ("ppo-kl0.05", "ppo", {"init_kl_coef": 0.05, "target_kl": None}, [(0.40, 6.0), (0.42, 6.2)]),
         ("ppo-kl0.2", "ppo", {"init_kl_coef": 0.2}, [(0.10, 1.0), (0.12, 1.2)])]


def fake_results() -> list[dict]:
    return [fake_result(label, seed, objective, options, reward, kl)
            for label, objective, options, values in CELLS for seed, (reward, kl) in enumerate(values)]


def test_frontier_points_average_seeds_and_keep_the_best_reward_per_kl():
    points = {p["label"]: p for p in align_report.points(fake_results())}
    assert set(points) == {label for label, *_ in CELLS}
    dpo = points["dpo-b0.03"]
    assert dpo["reward"] == pytest.approx(0.32) and dpo["reward_ci95"] == pytest.approx(ci95([0.30, 0.34]))
    assert dpo["kl"] == pytest.approx(4.2) and dpo["kl_ci95"] == pytest.approx(ci95([4.0, 4.4]))
    assert dpo["metric"] == "generation_exact_match" and points["ppo-kl0.05"]["metric"] == "exact_match"
    assert dpo["kind"] == points["ppo-kl0.05"]["kind"] == "exact match"  # one axis for DPO and PPO
    assert dpo["coefficient"] == 0.03 and points["ppo-kl0.2"]["coefficient"] == 0.2
    assert points["ppo-kl0.05"]["coefficient_text"] == "β_KL = 0.05 (fixed)"
    assert "adaptive" in points["ppo-kl0.2"]["coefficient_text"]  # PPO's default target_kl: adaptive β_KL
    # by KL: dpo-b1 0.6 (0.21), ppo-kl0.2 1.1 (0.11, dominated), dpo-b0.1 2.1 (0.31), dpo-b0.03 4.2 (0.32),
    # ppo-kl0.05 6.1 (0.41)
    front = [p["label"] for p in align_report.frontier(list(points.values()))]
    assert front == ["dpo-b1", "dpo-b0.1", "dpo-b0.03", "ppo-kl0.05"]


def test_report_has_the_reward_vs_kl_section_and_plot(tmp_path):
    from tunelab.experiments.report import write_report

    run_dir = tmp_path / "run"
    (run_dir / "results").mkdir(parents=True)
    for result in fake_results():
        (run_dir / "results" / f"{result['run_id']}.json").write_text(json.dumps(result))
    write_report(run_dir)
    markdown = (run_dir / "report.md").read_text()
    section = markdown[markdown.index("## Reward vs KL to the reference"):]
    assert "| dpo-b0.03 | align | dpo | β = 0.03 | 0.3200 ± " in section
    assert "| ppo-kl0.2 | align | ppo | β_KL = 0.2 (initial; adaptive, target KL 6) | 0.1100 ± " in section
    assert section.count("| yes |") == 4  # ppo-kl0.2 is dominated by dpo-b1 (less KL, more reward)
    assert "KL ≤ 0.6 → **dpo β=1** (0.2100)" in section
    assert "![reward vs KL](plots/alignment_frontier.png)" in section
    png = (run_dir / "plots" / "alignment_frontier.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    page = (run_dir / "report.html").read_text()
    assert "Reward vs KL to the reference" in page and 'alt="alignment_frontier"' in page


def test_no_section_without_kl_and_a_reward_model_gets_its_own_panel():
    results = fake_results()
    for result in results:
        result["stages"][1]["metrics"].pop("kl_ref")
    assert align_report.markdown_section(results) == "" and align_report.plots(results) == {}
    mixed = fake_results()
    mixed[-1]["stages"][1]["metrics"] = {"reward": -1.5, "kl_ref": 0.3, "score": -1.5}
    kinds = {p["kind"] for p in align_report.points(mixed)}
    assert kinds == {"exact match", "reward-model score"}
    assert align_report.plots(mixed)["alignment_frontier"].startswith(b"\x89PNG")


# ----------------------------------------------------------------------------------------- the shipped config
def test_shipped_frontier_config_resolves_into_dpo_betas_and_ppo_kl_coefficients():
    from tunelab.experiments.grid import expand_grid
    from tunelab.experiments.spec import load_spec, resolve_stages, validate

    spec = load_spec(CONFIGS / "alignment_frontier.yaml")
    cells = expand_grid(spec)
    settings = []
    for cell in cells:
        stages = resolve_stages(cell.spec)
        assert [s.name for s in stages] == ["sft", "align"]
        sft, align = stages
        assert sft.objective.name == "sft" and align.method is not None  # a fresh adapter on the SFT one
        options = registry.objective_config(align.objective.name, align.objective.options)
        assert options.reference == "sft_adapter" and options.eval_kl
        if align.objective.name == "dpo":
            settings.append(("dpo", options.beta))
        else:
            assert align.objective.name == "ppo" and options.reward == "exact_match" and options.target_kl is None
            assert options.max_new_tokens == cell.spec.eval.max_new_tokens  # greedy EM on DPO's horizon
            settings.append(("ppo", options.init_kl_coef))
        assert align.data.tasks == ["preference"]  # DPO and PPO cells score the same held-out prompts
    assert sorted(b for name, b in settings if name == "dpo") == [0.03, 0.1, 0.3, 1.0]
    assert 2 <= sum(name == "ppo" for name, _ in settings) <= 3
    # the SFT stage is configs/alignment.yaml's, shortened (300 -> 100 steps) to fit 7 cells in ~30 minutes
    alignment = yaml.safe_load((CONFIGS / "alignment.yaml").read_text())
    reference = resolve_stages(validate(alignment))[0]
    for cell in cells:
        sft = resolve_stages(cell.spec)[0]
        assert (sft.data.tasks, sft.data.domain, sft.data.train_size) == (
            reference.data.tasks, reference.data.domain, reference.data.train_size)
        assert (sft.train.batch_size, sft.train.learning_rate) == (reference.train.batch_size,
                                                                  reference.train.learning_rate)
        assert sft.train.max_steps == 100 and cell.spec.method.options == alignment["method"]["options"]


def test_the_shipped_config_runs_end_to_end_on_a_small_model(tmp_path, small_model_dir):
    """Two of its cells (a DPO beta, a PPO coefficient) shrunk to one step each on a small random Llama: both
    results carry kl_ref on the align stage, and the report gets the section and the plot."""
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import validate

    raw = yaml.safe_load((CONFIGS / "alignment_frontier.yaml").read_text())
    raw.update(output_dir=str(tmp_path / "runs"), model={"name": str(small_model_dir)})
    raw["data"].update(train_size=4, test_size=3, max_length=96)
    raw["train"].update(max_steps=1, batch_size=2)
    raw["eval"] = {"max_new_tokens": 3, "batch_size": 4, "latency_batches": 0}
    raw["stages"][0].update(data={"tasks": ["extractive_qa"], "train_size": 4}, train={"max_steps": 1})
    raw["grid"]["methods"] = [raw["grid"]["methods"][1], raw["grid"]["methods"][-1]]  # dpo-b0.1, ppo-kl0.2
    raw["grid"]["methods"][1]["overrides"]["objective"]["options"]["max_new_tokens"] = 3
    results = run_experiment(validate(raw), progress=False, isolate=False)
    assert [r["stages"][1]["objective"] for r in results] == ["dpo", "ppo"]
    assert all(r["stages"][1]["metrics"]["kl_ref"] >= 0 for r in results)
    run_dir = tmp_path / "runs" / "alignment_frontier"
    markdown = (run_dir / "report.md").read_text()
    assert "| dpo-b0.1 | align | dpo | β = 0.1 |" in markdown and "| ppo-kl0.2 | align | ppo | β_KL = 0.2 (fixed) |" in markdown
    assert (run_dir / "plots" / "alignment_frontier.png").stat().st_size > 5000
