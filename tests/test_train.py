"""Tests of tunelab.train: schedules, data order, accumulation, clipping, logging, eval, config errors."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.errors import ConfigError, DataError
from tunelab.train import TrainConfig, count_parameters, measure_latency, peak_rss_mb, train
from tunelab.train.profile import count_tokens, inference_latency
from tunelab.train.schedules import EpochSampler, lr_multiplier, make_scheduler, resolve_warmup_steps


# ----------------------------------------------------------------------------- tiny models and data
class Regressor(nn.Module):
    """y = w·x + b with an MSE loss, returned HF-style as ``.loss``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        prediction = self.linear(self.frozen(x))  # (B, 1)
        return SimpleNamespace(loss=F.mse_loss(prediction, y))


def regression_records(count: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    return [{"x": x[i].tolist(), "y": y[i].tolist()} for i in range(count)]


def collate_regression(records: list[dict]) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor([r["x"] for r in records]), "y": torch.tensor([r["y"] for r in records])}


def tiny_llama(dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        attention_dropout=dropout,
    )
    return LlamaForCausalLM(config)


def pattern_records(count: int) -> list[dict]:
    """Sequences of a fixed cyclic pattern (1..8 repeated) from different offsets."""
    return [{"ids": [(i + j) % 8 + 1 for j in range(12)]} for i in range(count)]


def collate_lm(records: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([r["ids"] for r in records])  # (B, T)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


class StepSpy:
    """Records gradients, learning rates and weight decays just before every AdamW step."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.lrs: list[list[float]] = []
        self.decays: list[list[tuple[tuple[int, ...], float]]] = []

    def __call__(self, optimizer, args, kwargs) -> None:
        groups = optimizer.param_groups
        self.grads.append([p.grad.clone() for g in groups for p in g["params"] if p.grad is not None])
        self.lrs.append([g["lr"] for g in groups])
        self.decays.append([(tuple(p.shape), g["weight_decay"]) for g in groups for p in g["params"]])

    def __enter__(self) -> StepSpy:
        self.handle = register_optimizer_step_pre_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def grad_norm(grads: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


# ----------------------------------------------------------------------------- schedules
def test_lr_multiplier_warmup_then_cosine_linear_constant():
    kw = {"warmup_steps": 4, "total_steps": 20}
    assert [lr_multiplier(s, schedule="cosine", **kw) for s in range(5)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1.0]
    )
    assert lr_multiplier(12, schedule="cosine", **kw) == pytest.approx(0.5)  # halfway through the decay
    assert lr_multiplier(8, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(20, schedule="cosine", **kw) == pytest.approx(0.0)
    assert lr_multiplier(12, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_multiplier(16, schedule="linear", **kw) == pytest.approx(0.25)
    assert lr_multiplier(19, schedule="constant", **kw) == 1.0
    assert lr_multiplier(2, schedule="constant", **kw) == pytest.approx(0.6)
    assert lr_multiplier(20, schedule="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_multiplier(12, schedule="linear", min_lr_ratio=0.1, **kw) == pytest.approx(0.55)


def test_warmup_resolution_and_scheduler_drive_the_optimizer():
    assert resolve_warmup_steps(100, None, 0.05) == 5
    assert resolve_warmup_steps(100, 7, 0.5) == 7  # warmup_steps wins
    assert resolve_warmup_steps(10, 50, 0.0) == 10
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [param], "lr": 1.0}])
    scheduler = make_scheduler(optimizer, schedule="linear", warmup_steps=1, total_steps=5)
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25])


def test_sampler_walks_seeded_permutations_and_resumes_from_its_position():
    sampler = EpochSampler(10, batch_size=3, seed=7)
    epoch0 = [sampler.next_indices() for _ in range(3)]  # 9 of 10 records; the tail is skipped
    assert len({i for batch in epoch0 for i in batch}) == 9 and all(len(b) == 3 for b in epoch0)
    assert sampler.state_dict() == {"epoch": 0, "position": 9}
    state = sampler.state_dict()
    continuation = [sampler.next_indices() for _ in range(4)]  # epoch 1, then into epoch 2
    assert sampler.state_dict() == {"epoch": 2, "position": 3}
    resumed = EpochSampler(10, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_indices() for _ in range(4)] == continuation
    other_seed = EpochSampler(10, batch_size=3, seed=8)
    assert [other_seed.next_indices() for _ in range(3)] != epoch0
    assert EpochSampler(2, batch_size=5, seed=0).next_indices() in ([0, 1], [1, 0])  # fewer than a batch


# ----------------------------------------------------------------------------- the loop
def test_grad_accumulation_matches_one_large_batch():
    records = regression_records(16)
    results = {}
    for batch_size, grad_accum in ((8, 1), (4, 2)):
        model = Regressor()
        config = TrainConfig(
            learning_rate=0.05, max_steps=2, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=None
        )
        with StepSpy() as spy:
            train(model, records, collate_regression, config, progress=False)
        results[grad_accum] = (spy.grads, model.linear.weight.detach().clone())
    (grads_1, weight_1), (grads_2, weight_2) = results[1], results[2]
    assert len(grads_1) == len(grads_2) == 2
    for step_1, step_2 in zip(grads_1, grads_2, strict=True):
        for g1, g2 in zip(step_1, step_2, strict=True):
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)  # same gradient, not just same sign
    torch.testing.assert_close(weight_1, weight_2, rtol=1e-5, atol=1e-6)
    assert not torch.equal(weight_1, Regressor().linear.weight)


def test_gradient_clipping_caps_the_norm_and_logs_the_raw_one():
    records = regression_records(16)
    config = TrainConfig(learning_rate=0.01, max_steps=3, batch_size=8, max_grad_norm=0.01, log_every=1)
    with StepSpy() as spy:
        result = train(Regressor(), records, collate_regression, config, progress=False)
    logged = [r["grad_norm"] for r in result.history if "grad_norm" in r]
    assert len(logged) == 3
    for raw, grads in zip(logged, spy.grads, strict=True):
        assert raw > 0.1  # the regression starts far from its target: large gradients
        assert grad_norm(grads) == pytest.approx(0.01, rel=1e-4)  # clipped to max_grad_norm
    unclipped = TrainConfig(learning_rate=0.01, max_steps=1, batch_size=8, max_grad_norm=None, log_every=1)
    with StepSpy() as spy:
        result = train(Regressor(), records, collate_regression, unclipped, progress=False)
    assert grad_norm(spy.grads[0]) == pytest.approx(result.history[0]["grad_norm"], rel=1e-5)


def test_only_trainable_parameters_change_and_are_saved(tmp_path):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    for layer in model.model.layers:
        layer.mlp.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(learning_rate=1e-2, max_steps=3, batch_size=4)
    train(model, pattern_records(8), collate_lm, config, output_dir=tmp_path, progress=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name
    saved = load_file(str(tmp_path / "trainable.safetensors"))
    assert set(saved) == trainable
    assert set(load_file(str(tmp_path / "checkpoint" / "trainable.safetensors"))) == trainable
    assert all(
        torch.equal(saved[name], p.detach()) for name, p in model.named_parameters() if name in trainable
    )


def test_loss_decreases_on_a_fixed_pattern():
    model = tiny_llama()
    config = TrainConfig(learning_rate=1e-2, max_steps=40, batch_size=8, log_every=5, warmup_steps=2)
    result = train(model, pattern_records(32), collate_lm, config, progress=False)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 8
    assert losses[-1] < 0.25 * losses[0]  # log(64) ≈ 4.2 at init; the pattern is deterministic
    assert result.steps == 40 and result.final_loss == losses[-1]
    assert result.tokens_per_second > 0 and result.train_seconds > 0


def test_metrics_jsonl_eval_every_and_model_modes(tmp_path):
    modes = []

    def loss_fn(model, batch):
        modes.append(model.training)
        return model(**batch).loss

    model = tiny_llama(dropout=0.1)
    config = TrainConfig(learning_rate=1e-2, max_steps=7, batch_size=4, log_every=2, eval_every=3)
    result = train(
        model,
        pattern_records(16),
        collate_lm,
        config,
        eval_records=pattern_records(6),
        output_dir=tmp_path,
        loss_fn=loss_fn,
        eval_fn=lambda m: {"eval_marker": float(m.training)},
        progress=False,
    )
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    train_lines = [r for r in lines if "loss" in r]
    eval_lines = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6, 7]
    assert [r["step"] for r in eval_lines] == [3, 6, 7]  # every 3 steps and at the end
    for r in train_lines:
        assert set(r) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
    assert all(r["eval_marker"] == 0.0 and math.isfinite(r["eval_loss"]) for r in eval_lines)
    assert result.final_eval_loss == eval_lines[-1]["eval_loss"]
    # training batches ran in train mode, eval batches (2 of 4 records each time) in eval mode
    assert modes.count(True) == 7 and modes.count(False) == 3 * 2
    assert model.training is False
    assert (tmp_path / "checkpoint" / "state.json").is_file()


def test_param_groups_keep_their_learning_rates_and_decay_skips_vectors():
    config = TrainConfig(learning_rate=0.1, max_steps=2, batch_size=4, schedule="constant", weight_decay=0.1)
    with StepSpy() as spy:
        train(Regressor(), regression_records(8), collate_regression, config, progress=False)
    assert spy.decays[-1] == [((1, 4), 0.1), ((1,), 0.0)]  # the matrix decays, the bias does not
    model = Regressor()
    groups = [{"params": [model.linear.bias], "lr": 0.5, "weight_decay": 0.0}]
    with StepSpy() as spy:
        train(model, regression_records(8), collate_regression, config, param_groups=groups, progress=False)
    assert spy.lrs[-1] == pytest.approx([0.5, 0.1])  # the given group, then the default one (the weight)
    assert spy.decays[-1] == [((1,), 0.0), ((1, 4), 0.1)]
    with pytest.raises(ConfigError, match="param_groups"):
        train(
            model,
            regression_records(8),
            collate_regression,
            config,
            param_groups=[{"params": [model.frozen.weight]}],
            progress=False,
        )


def test_callback_can_stop_training(tmp_path):
    seen = []

    def stop_at_three(record):
        seen.append(record["step"])
        return record["step"] >= 3

    config = TrainConfig(max_steps=10, batch_size=4, log_every=1)
    result = train(
        Regressor(),
        regression_records(8),
        collate_regression,
        config,
        output_dir=tmp_path,
        callbacks=[stop_at_three],
        progress=False,
    )
    assert result.steps == 3 and result.stopped_early and seen == [1, 2, 3]
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 3


def test_progress_bar_works_off_a_terminal(capsys):
    result = train(
        Regressor(),
        regression_records(8),
        collate_regression,
        TrainConfig(max_steps=2, batch_size=4),
        progress=True,
    )
    assert result.steps == 2
    assert "2/2" in capsys.readouterr().err


def test_fp16_on_cpu_falls_back_and_bf16_trains(caplog):
    with caplog.at_level(logging.WARNING, logger="tunelab.train.loop"):
        result = train(
            Regressor(),
            regression_records(8),
            collate_regression,
            TrainConfig(max_steps=2, batch_size=4, mixed_precision="fp16"),
            progress=False,
        )
    assert result.steps == 2 and "fp16" in caplog.text
    model = tiny_llama()
    config = TrainConfig(max_steps=2, batch_size=4, mixed_precision="bf16", log_every=1)
    result = train(model, pattern_records(8), collate_lm, config, progress=False)
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert "_original_forward" not in model.__dict__  # the autocast wrapper is removed afterwards


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"schedule": "exponential"}, "schedule"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"adam_betas": (0.9, 1.5)}, "adam_betas"),
        ({"lerning_rate": 1e-3}, "lerning_rate"),
    ],
)
def test_config_errors_are_one_line(options, fragment):
    with pytest.raises(ConfigError, match=fragment) as error:
        TrainConfig(**options)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig.model_validate(options)
    with pytest.raises(ConfigError, match=fragment):
        train(Regressor(), regression_records(4), collate_regression, options, progress=False)


def test_bad_inputs_raise_user_errors():
    config = TrainConfig(max_steps=1, batch_size=2)
    with pytest.raises(DataError, match="empty"):
        train(Regressor(), [], collate_regression, config, progress=False)
    with pytest.raises(DataError, match="eval_records"):
        train(Regressor(), regression_records(4), collate_regression, config, eval_records=[], progress=False)
    frozen = Regressor().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train(frozen, regression_records(4), collate_regression, config, progress=False)
    no_labels = lambda records: {"input_ids": collate_lm(records)["input_ids"]}  # noqa: E731
    with pytest.raises(DataError, match="labels"):
        train(tiny_llama(), pattern_records(4), no_labels, config, progress=False)
    with pytest.raises(ConfigError, match="output_dir"):
        train(Regressor(), regression_records(4), collate_regression, config, resume=True, progress=False)
    diverging = TrainConfig(max_steps=3, batch_size=2, learning_rate=1e30, max_grad_norm=None)
    with pytest.raises(ConfigError, match="learning_rate"):
        train(
            Regressor(),
            regression_records(4),
            lambda rs: {k: v * 1e20 for k, v in collate_regression(rs).items()},
            diverging,
            progress=False,
        )
    assert TrainConfig.model_validate({"max_steps": 5}).max_steps == 5
    assert TrainConfig.model_json_schema()["properties"]["learning_rate"]["description"]


# ----------------------------------------------------------------------------- profile helpers
def test_profile_helpers():
    counts = count_parameters(Regressor())
    assert (counts.trainable, counts.total) == (5, 25) and counts.fraction == pytest.approx(0.2)
    assert peak_rss_mb() > 10
    batch = {
        "input_ids": torch.ones(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]),
    }
    assert count_tokens(batch) == 7 and count_tokens({"input_ids": batch["input_ids"]}) == 10
    assert count_tokens((batch["input_ids"],)) == 0
    calls = []
    stats = measure_latency(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and stats.repeats == 3 and 0 <= stats.min_s <= stats.median_s
    model = tiny_llama()
    stats = inference_latency(model, {"input_ids": batch["input_ids"]}, repeats=2)
    assert stats.median_s > 0 and model.training  # mode restored
