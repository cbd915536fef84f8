"""The objective seam: objectives, their registry, typed options at load time, samplers and stages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.experiments import registry
from tunelab.experiments.spec import validate
from tunelab.train import TrainConfig, train
from tunelab.train.objective import BaseObjective, LossOutput, ObjectiveConfig, is_objective
from tunelab.train.samplers import GroupSampler, group_probabilities

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"


# ----------------------------------------------------------------------------- registry
def test_plain_objectives_are_registered_with_summaries_and_model_tasks():
    assert registry.objectives()[:4] == ["sft", "lm", "classification", "token_classification"]
    for name in registry.objectives():
        entry = registry.get_objective(name)
        assert entry.summary and issubclass(entry.config_class, ObjectiveConfig)
        assert all(hasattr(entry.objective_class, hook) for hook in ("loss", "collator", "modules", "state_dict"))
    for name in ("sft", "lm", "classification", "token_classification"):  # no required options
        assert is_objective(registry.build_objective(name))
    assert registry.get_objective("classification").model_task == "sequence_classification"
    with pytest.raises(ConfigError, match="unknown objective 'dpoo'; choose one of: sft"):
        registry.get_objective("dpoo")


def test_loop_and_runner_know_no_objective_by_name():
    for path in (SRC / "train" / "loop.py", SRC / "experiments" / "runner.py"):
        text = path.read_text()
        for name in ("sft", "classification", "token_classification"):
            assert not re.search(rf"[=!]=\s*\"{name}\"", text), f"{path.name} routes on objective {name!r}"


# ----------------------------------------------------------------------------- options at load time
def _spec(**sections) -> dict:
    return {"name": "x", "model": {"name": "does-not-matter"}, **sections}


@pytest.mark.parametrize(
    ("sections", "location", "hint"),
    [
        ({"method": {"name": "lora", "options": {"rr": 8}}}, "method.options.rr", "valid options: r, "),
        ({"method": {"name": "loar"}}, "method.name", "choose one of: full, lora"),
        ({"objective": {"name": "sft", "options": {"temprature": 2}}}, "objective.options.temprature",
         "the objective takes no options"),
        ({"objective": "telepathy"}, "objective.name", "unknown objective 'telepathy'"),
        ({"grid": {"methods": [{"name": "full"}, {"name": "ia3", "options": {"target_module": "q"}}]}},
         "grid.methods.1.options.target_module", "valid options:"),
        ({"stages": [{"name": "a"}, {"name": "b", "method": {"name": "lora", "options": {"alpha": 2}}}]},
         "stages.1.method.options.alpha", "valid options:"),
        ({"stages": [{"data": {"domian": "legal"}}]}, "stages.0.data.domian", "unknown key"),
        ({"stages": [{"train": {"learning_rate": -1}}]}, "stages.0.train", "learning_rate"),
        ({"stages": [{"name": "a"}, {"name": "a"}]}, "stages.1.name", "distinct name"),
        ({"objective": {"name": "lm", "options": {"text_field": 3}}}, "objective.options.text_field", "string"),
    ],
)
def test_option_typos_fail_at_load_time_naming_the_key(sections, location, hint):
    with pytest.raises(ConfigError) as caught:
        validate(_spec(**sections), "exp.yaml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("exp.yaml: ")
    assert f"'{location}" in message, message
    assert hint in message, message


def test_stages_must_share_one_model_head():
    with pytest.raises(ConfigError, match="different model heads"):
        validate(_spec(stages=[{"objective": "sft"}, {"objective": "classification"}]))


def test_bare_objective_string_and_mapping_are_the_same():
    assert validate(_spec(objective="sft")).objective == validate(_spec(objective={"name": "sft"})).objective


# ----------------------------------------------------------------------------- the loop with an objective
class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 1)

    def forward(self, x, y):
        return type("Out", (), {"loss": ((self.linear(x) - y) ** 2).mean()})()


RECORDS = [{"x": [float(i % 3), 1.0, -float(i % 5)], "y": [float(i % 4)], "group": i % 2} for i in range(24)]


def _collate(records):
    return {"x": torch.tensor([r["x"] for r in records]), "y": torch.tensor([r["y"] for r in records])}


class Weighted(BaseObjective):
    """L' = exp(-s) L + s with s learned (a toy uncertainty weight) and a per-group sampler."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.scale.weight)
        self.sampled: list[list[int]] = []

    def make_collator(self, tokenizer, labels, **_):
        return _collate

    def modules(self):
        return [self.scale]

    def sampler(self, records, config, rank=0, world_size=1):
        groups = [[i for i, r in enumerate(records) if r["group"] == g] for g in (0, 1)]
        return GroupSampler(groups, config.batch_size, config.seed, strategy="uniform")

    def loss(self, model, batch) -> LossOutput:
        s = self.scale.weight.squeeze()
        mse = model(**batch).loss
        return LossOutput(torch.exp(-s) * mse + s, {"mse": mse.item(), "s": s.item()})


def test_objective_modules_train_metrics_are_logged_and_the_sampler_hook_is_used(tmp_path):
    objective = Weighted()
    result = train(Regressor(), RECORDS, objective, TrainConfig(max_steps=6, batch_size=4, log_every=2,
                                                               learning_rate=0.05), output_dir=tmp_path,
                   progress=False)
    assert objective.scale.weight.item() != 0.0  # the objective's module was in the optimizer
    train_lines = [r for r in result.history if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6]
    assert all({"mse", "s"} <= set(r) for r in train_lines)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["mse"] == pytest.approx(train_lines[0]["mse"])
    checkpoint = torch.load(tmp_path / "checkpoint" / "optimizer.pt", weights_only=True)
    assert sum(len(g["params"]) for g in checkpoint["param_groups"]) == 3  # weight, bias, the scale
    from tunelab.train import checkpoint as ckpt

    state = ckpt.load_checkpoint(tmp_path)
    assert "objective.0.weight" in state.trainable and "groups" in state.state["data"]


def test_loss_fn_with_an_objective_is_refused():
    with pytest.raises(ConfigError, match="loss_fn goes with a collate function"):
        train(Regressor(), RECORDS, Weighted(), TrainConfig(max_steps=1), loss_fn=lambda m, b: m(**b).loss,
              progress=False)


# ----------------------------------------------------------------------------- samplers
def test_group_probabilities_follow_n_to_the_alpha():
    sizes = [100, 10]
    assert group_probabilities(sizes, "proportional") == pytest.approx([100 / 110, 10 / 110])
    assert group_probabilities(sizes, "uniform") == pytest.approx([0.5, 0.5])
    t = group_probabilities(sizes, "temperature", temperature=2.0)
    assert t == pytest.approx([10 / (10 + 10**0.5), 10**0.5 / (10 + 10**0.5)])
    assert group_probabilities(sizes, "annealed", progress=0.0) == pytest.approx(group_probabilities(sizes, "proportional"))
    assert group_probabilities(sizes, "annealed", progress=1.0) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="choose one of"):
        group_probabilities(sizes, "round-robin")


def test_group_sampler_batches_come_from_one_group_and_resume_exactly():
    groups = [list(range(0, 30)), list(range(100, 106))]
    sampler = GroupSampler(groups, 4, seed=3, strategy="temperature", temperature=3.0)
    for _ in range(5):
        batch = sampler.next_indices()
        assert all(i < 30 for i in batch) or all(i >= 100 for i in batch)
    state = json.loads(json.dumps(sampler.state_dict()))  # JSON-able, as in state.json
    expected = [sampler.next_indices() for _ in range(12)]
    resumed = GroupSampler(groups, 4, seed=3, strategy="temperature", temperature=3.0)
    resumed.load_state_dict(state)
    assert [resumed.next_indices() for _ in range(12)] == expected


def test_group_sampler_mixed_batches_draw_each_row_and_match_the_probabilities():
    groups = [list(range(0, 50)), list(range(50, 60))]
    sampler = GroupSampler(groups, 8, seed=0, strategy="proportional", mixed=True)
    rows = [i for _ in range(200) for i in sampler.next_indices()]
    share = sum(i >= 50 for i in rows) / len(rows)
    assert share == pytest.approx(10 / 60, abs=0.03)
    assert any(len({i >= 50 for i in sampler.next_indices()}) == 2 for _ in range(20))  # mixed batches


# ----------------------------------------------------------------------------- stages end to end
def test_two_stages_from_the_cli_write_per_stage_results_and_the_cross_evaluation(tmp_path, small_model_dir):
    from tunelab.cli import main

    config = tmp_path / "staged.yaml"
    config.write_text(
        f"name: staged\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: '{small_model_dir}'}}\n"
        "method: {name: lora, options: {r: 4, target_modules: all-linear}}\n"
        "data: {tasks: [summarization], domain: medical, train_size: 16, eval_size: 0, test_size: 4}\n"
        "train: {max_steps: 2, batch_size: 4, eval_every: null, save_every: null}\n"
        "eval: {max_new_tokens: 4, latency_batches: 0}\n"
        "stages:\n  - {name: medical}\n  - {name: legal, data: {domain: legal}, train: {max_steps: 3}}\n"
    )
    assert main(["run", str(config), "--in-process"]) == 0
    run_dir = tmp_path / "runs" / "staged"
    (result_path,) = (run_dir / "results").glob("*.json")
    record = json.loads(result_path.read_text())
    assert [s["name"] for s in record["stages"]] == ["medical", "legal"]
    assert [s["steps"] for s in record["stages"]] == [2, 3]
    scores = record["stage_matrix"]["scores"]
    assert scores[0][1] is None and all(v is not None for v in (scores[0][0], scores[1][0], scores[1][1]))
    assert record["metrics"] == record["stages"][1]["metrics"]
    assert {e["stage"] for e in record["history"]} == {"medical", "legal"}
    report = (run_dir / "report.md").read_text()
    assert "## Stages" in report and "| after \\ test on | medical | legal |" in report
    assert (run_dir / "plots" / "stage_matrix.png").stat().st_size > 1000


def test_a_stage_method_adds_a_new_adapter_that_trains_alone(tmp_path, small_model_dir):
    from tunelab import tuners
    from tunelab.experiments.preflight import apply_method
    from tunelab.experiments.runner import _train_only
    from tunelab.experiments.spec import MethodSpec
    from tunelab.models import zoo

    model, _ = zoo.load(str(small_model_dir))
    model = apply_method(model, MethodSpec(name="lora", options={"r": 2, "target_modules": ["q_proj"]}), "causal_lm")
    model = apply_method(model, MethodSpec(name="lora", options={"r": 2, "target_modules": ["q_proj"]}),
                         "causal_lm", adapter_name="legal")
    _train_only(model, ["legal"])
    assert set(tuners.active_adapters(model)) == {"default", "legal"}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".legal" in name for name in trainable)


def test_cli_lists_objectives_and_methods_with_summaries(capsys):
    from tunelab.cli import main

    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^sft\s+supervised fine-tuning", out, re.M)
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^lora\s+LoRA", out, re.M) and re.search(r"^ia3\s+\(IA\)", out, re.M)


def test_grid_params_make_distinct_report_rows_not_seeds():
    from tunelab.experiments.grid import expand_grid
    from tunelab.experiments.report import summarize

    spec = validate(_spec(grid={"seeds": [0, 1], "params": {"train.learning_rate": [0.001, 0.01],
                                                            "objective": [{"name": "sft"}]}}))
    cells = expand_grid(spec)
    assert sorted({c.method_label for c in cells}) == ["lora (objective=sft, learning_rate=0.001)",
                                                       "lora (objective=sft, learning_rate=0.01)"]
    results = [{"method_label": c.method_label, "train_size": 800, "metrics": {"score": float(i)},
                "trainable_parameters": 1, "trainable_percent": 1.0, "train_seconds": 1.0,
                "train_tokens_per_second": 1.0, "peak_memory_mb": 1.0} for i, c in enumerate(cells)]
    rows = summarize(results)
    assert len(rows) == 2 and all(row["seeds"] == 2 for row in rows)
