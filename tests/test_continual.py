"""Continual learning: EWC, replay, LwF, O-LoRA, per-domain adapters — each equation, state across stages, resume."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from tunelab import tuners
from tunelab.adapt.ewc import EWCObjective, ewc_penalty, fisher_diagonal
from tunelab.adapt.lwf import LwFObjective
from tunelab.adapt.olora import OLoRAObjective, orthogonality_penalty
from tunelab.adapt.per_domain import PerDomainObjective
from tunelab.adapt.replay import ReplayObjective, quota_update, replay_count, reservoir_update
from tunelab.adapt.store import store
from tunelab.models import testing
from tunelab.train import TrainConfig, train


class _Acc:
    device = torch.device("cpu")


def _toy_records(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return [{"x": x[i], "y": int(y[i])} for i in range(n)]


def _toy_collate(records):
    return {"x": torch.stack([r["x"] for r in records]), "labels": torch.tensor([r["y"] for r in records])}


# ----------------------------------------------------------------------------- EWC
def test_fisher_is_the_mean_squared_per_example_gradient():
    model = testing.toy_mlp()
    records = _toy_records()
    params = dict(model.named_parameters())
    fisher = fisher_diagonal(model, records, _toy_collate, params, samples=6, batch_size=1)
    for name, p in params.items():
        expected = torch.zeros_like(p)
        for record in records:
            model.zero_grad()
            model(**_toy_collate([record])).loss.backward()
            expected += p.grad ** 2
        torch.testing.assert_close(fisher[name], expected / 6)


def test_true_fisher_is_the_expectation_over_the_models_own_labels():
    """F_i = (1/N) Σ_n Σ_c p(c|x_n) (∂ log p(c|x_n) / ∂θ_i)²: the draws' mean converges to the exact sum."""
    model = testing.toy_mlp()
    records = _toy_records()
    params = dict(model.named_parameters())
    exact = {name: torch.zeros_like(p) for name, p in params.items()}
    for record in records:
        probs = torch.softmax(model(x=record["x"][None]).logits.detach(), -1)[0]
        for c in range(probs.numel()):
            model.zero_grad()
            model(x=record["x"][None], labels=torch.tensor([c])).loss.backward()
            for name, p in params.items():
                exact[name] += probs[c] * p.grad ** 2 / len(records)
    repeats = 300
    drawn = fisher_diagonal(model, records * repeats, _toy_collate, params, samples=len(records) * repeats,
                            kind="true", generator=torch.Generator().manual_seed(1))
    for name in params:
        rel = (drawn[name] - exact[name]).norm() / exact[name].norm()
        assert rel < 0.1, (name, float(rel))
    # it is not the empirical Fisher: the data's labels are not the model's
    empirical = fisher_diagonal(model, records, _toy_collate, params, samples=6)
    assert (empirical["classifier.weight"] - exact["classifier.weight"]).norm() > 0.2 * exact["classifier.weight"].norm()


def test_model_labels_draw_the_next_token_where_the_data_scores():
    from tunelab.adapt.ewc import model_labels

    logits = torch.full((1, 4, 5), -1e4)
    for t, token in enumerate([3, 1, 4, 2]):
        logits[0, t, token] = 0.0  # the model is certain: position t predicts `token` at t + 1
    labels = torch.tensor([[-100, -100, 7, 8]])
    out = model_labels(logits, labels, torch.Generator().manual_seed(0))
    assert out.tolist() == [[-100, -100, 1, 4]]  # scored positions 2, 3 drawn from logits 1, 2
    with pytest.raises(ValueError, match="fisher: empirical"):
        model_labels(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, dtype=torch.long), torch.Generator())


def test_ewc_penalty_equation():
    theta = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    anchor = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[1.5]])}
    fisher = {"a": torch.tensor([2.0, 3.0]), "b": torch.tensor([[4.0]])}
    # λ/2 Σ F (θ-θ*)² = 10/2 * (2*1 + 3*1 + 4*1)
    assert float(ewc_penalty(theta, fisher, anchor, 10.0)) == pytest.approx(45.0)
    assert float(ewc_penalty(theta, fisher, {"c": torch.zeros(1)}, 10.0)) == 0.0


def test_online_ewc_decays_the_running_fisher_and_moves_the_anchor():
    model = testing.toy_mlp()
    records = _toy_records()
    objective = EWCObjective(gamma=0.5, fisher_samples=6)
    objective.collate_fn = _toy_collate
    params = dict(model.named_parameters())
    objective.on_stage_end(model, records)
    first = {k: v.clone() for k, v in store(model)["ewc"]["fisher"].items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1)
    objective.on_stage_end(model, records[:3])
    fresh = fisher_diagonal(model, records[:3], _toy_collate, params, samples=6)
    state = store(model)["ewc"]
    for name, p in params.items():
        torch.testing.assert_close(state["fisher"][name], 0.5 * first[name] + fresh[name])
        assert torch.equal(state["anchor"][name], p.detach())
    # the next stage's objective finds them on the model and pays the penalty when weights move
    nxt = EWCObjective(ewc_lambda=2.0)
    nxt.setup(model, _Acc())
    assert float(nxt.loss(model, _toy_collate(records)).metrics["ewc"]) == 0.0
    with torch.no_grad():
        params["classifier.bias"].add_(1.0)
    out = nxt.loss(model, _toy_collate(records))
    assert out.metrics["ewc"] == pytest.approx(float(state["fisher"]["classifier.bias"].sum()), rel=1e-5)


# ----------------------------------------------------------------------------- replay
def test_reservoir_keeps_every_item_with_probability_m_over_n():
    n, m, trials = 20, 5, 3000
    counts = [0] * n
    for trial in range(trials):
        buffer, seen = reservoir_update([], 0, range(8), m, seed=trial)  # two stages: 8 then 12 items
        buffer, seen = reservoir_update(buffer, seen, range(8, 20), m, seed=trial)
        assert seen == n and len(buffer) == m and len(set(buffer)) == m
        for item in buffer:
            counts[item] += 1
    for count in counts:
        assert abs(count / trials - m / n) < 0.04, counts


def test_quota_gives_each_domain_an_equal_share():
    groups = quota_update([], list(range(10)), 6, seed=0)
    assert [len(g) for g in groups] == [6]
    groups = quota_update(groups, list(range(100, 110)), 6, seed=0)
    assert [len(g) for g in groups] == [3, 3]
    assert set(groups[0]) <= set(range(10)) and set(groups[1]) <= set(range(100, 110))
    assert quota_update([], list(range(10)), 6, seed=0) == quota_update([], list(range(10)), 6, seed=0)
    assert replay_count(8, 0.25) == 3 and replay_count(8, 0.5) == 8


def _sft_setup(small_model_dir):
    from tunelab.data import synthetic
    from tunelab.models import zoo

    model, tokenizer = zoo.load(str(small_model_dir), progress=False)
    torch.manual_seed(0)  # the same LoRA initialisation in every call
    tuners.apply(model, "lora", r=2, target_modules="all-linear")
    general = synthetic.make_task("qa", domain="general", split="train", n=12, seed=0)
    medical = synthetic.make_task("qa", domain="medical", split="train", n=12, seed=0)
    return model, tokenizer, general, medical


def _replay(tokenizer):
    objective = ReplayObjective(buffer_size=6, replay_ratio=0.5)
    objective.collator(tokenizer, None, max_length=64)
    return objective


def test_replay_resume_is_exact(small_model_dir, tmp_path):
    """Stage 2 with a replay buffer, interrupted at step 2 and resumed, ends bitwise where an uninterrupted run does."""
    config = TrainConfig(max_steps=4, batch_size=4, learning_rate=1e-2, save_every=2, log_every=1)

    def stage_two(stop_at=None, resume=False, out="run"):
        model, tokenizer, general, medical = _sft_setup(small_model_dir)
        store(model)  # a fresh process: the buffer comes from stage 1 ...
        first = _replay(tokenizer)
        first.on_stage_end(model, general)
        if resume:  # ... or, after a restart, from the checkpoint only
            store(model).clear()
        objective = _replay(tokenizer)
        callbacks = [lambda event: event.get("step") == stop_at] if stop_at else None
        train(model, medical, objective, config, output_dir=tmp_path / out, resume=resume, progress=False,
              callbacks=callbacks)
        return model, objective

    reference, objective = stage_two(out="ref")
    assert len(objective.buffer) == 6 and objective.replay.state_dict()["position"] > 0
    stage_two(stop_at=2, out="cut")
    resumed, _ = stage_two(resume=True, out="cut")
    for (name, a), (_, b) in zip(tuners.trainable_parameters(reference), tuners.trainable_parameters(resumed),
                                 strict=True):
        assert torch.equal(a, b), name


def test_replay_mixes_buffer_examples_into_training_steps(small_model_dir):
    model, tokenizer, general, medical = _sft_setup(small_model_dir)
    _replay(tokenizer).on_stage_end(model, general)
    objective = _replay(tokenizer)
    objective.setup(model, _Acc())
    model.train()
    out = objective.loss(model, objective.collate_fn(medical[:4]))
    assert "ce_replay" in out.metrics
    model.eval()  # the periodic eval loss is the current domain's only
    assert "ce_replay" not in objective.loss(model, objective.collate_fn(medical[:4])).metrics


# ----------------------------------------------------------------------------- LwF
def test_lwf_teacher_is_the_snapshot_and_weights_are_restored(small_model_dir):
    model, tokenizer, general, medical = _sft_setup(small_model_dir)
    first = LwFObjective()
    first.collator(tokenizer, None, max_length=64)
    first.on_stage_end(model, general)
    snapshot_model = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in tuners.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    moved = {n: p.detach().clone() for n, p in tuners.trainable_parameters(model)}
    lwf = LwFObjective(alpha=1.0, temperature=1.0)
    lwf.collator(tokenizer, None, max_length=64)
    lwf.setup(model, _Acc())
    batch = lwf.collate_fn(medical[:3])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    from tunelab.adapt.lwf import teacher_logits

    teacher = teacher_logits(model, lwf.params, lwf.saved, inputs)
    torch.testing.assert_close(teacher, snapshot_model(**inputs).logits, rtol=0, atol=0)
    for name, p in tuners.trainable_parameters(model):
        assert torch.equal(p, moved[name]), name
    out = lwf.loss(model, batch)
    assert out.metrics["lwf_kd"] > 0
    # the KD term is zero when the model equals its snapshot
    fresh = LwFObjective()
    fresh.collator(tokenizer, None, max_length=64)
    fresh.setup(snapshot_model, _Acc())
    assert fresh.loss(snapshot_model, batch).metrics.get("lwf_kd", 0.0) == 0.0
    fresh.saved = lwf.saved
    fresh.params = dict(snapshot_model.named_parameters())
    assert fresh.loss(snapshot_model, batch).metrics["lwf_kd"] == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- O-LoRA
def _two_adapter_model():
    model = testing.tiny_llama()
    tuners.apply(model, "lora", r=2, target_modules=["q_proj", "v_proj"], adapter_name="s0")
    tuners.apply(model, "lora", r=3, target_modules=["q_proj", "v_proj"], adapter_name="s1")
    tuners.set_active(model, ["s0", "s1"])
    for name, p in model.named_parameters():
        p.requires_grad_(".s1." in name)
    return model


def test_olora_penalty_equation_and_gradient():
    a_new, a_old = torch.randn(3, 5), torch.randn(2, 5)
    expected = sum(float((a_new[i] @ a_old[j]) ** 2) for i in range(3) for j in range(2))
    assert float(orthogonality_penalty([(a_new, [a_old])])) == pytest.approx(expected, rel=1e-5)
    model = _two_adapter_model()
    store(model)["olora"] = ["s0"]
    objective = OLoRAObjective(orth_lambda=0.5)
    objective.setup(model, _Acc())
    assert objective.adapter == "s1" and len(objective.pairs) == 2 * 2  # q and v in two layers
    manual = sum(((m.lora_A["s1"].weight @ m.lora_A["s0"].weight.T) ** 2).sum()
                 for m in model.modules() if hasattr(m, "lora_A") and "s1" in getattr(m, "lora_A", {}))
    torch.testing.assert_close(orthogonality_penalty(objective.pairs), manual)
    orthogonality_penalty(objective.pairs).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}
    assert all(g is not None for n, g in grads.items() if ".s1." in n)
    assert all(g is None for n, g in grads.items() if ".s0." in n)
    objective.on_stage_end(model, [])
    assert store(model)["olora"] == ["s0", "s1"]


def test_olora_without_a_new_adapter_is_a_config_error():
    from tunelab.errors import ConfigError

    model = _two_adapter_model()
    store(model)["olora"] = ["s0", "s1"]
    with pytest.raises(ConfigError, match="new LoRA adapter per stage"):
        OLoRAObjective().setup(model, _Acc())


# ----------------------------------------------------------------------------- per-domain adapters
def test_per_domain_adapters_leave_earlier_domains_bitwise_unchanged(small_model_dir):
    from tunelab.data import synthetic

    model, tokenizer, general, medical = _sft_setup(small_model_dir)
    test = synthetic.make_task("qa", domain="general", split="test", n=4, seed=0)
    config = TrainConfig(max_steps=3, batch_size=4, learning_rate=5e-2)
    objectives, outputs = [], []
    for stage, records in (("general", general), ("medical", medical)):
        tuners.apply(model, "lora", r=2, target_modules="all-linear", adapter_name=stage)
        tuners.set_active(model, tuners.adapters(model))  # as the runner leaves them: all active ...
        for name, p in model.named_parameters():  # ... and only the new one trainable
            p.requires_grad_(f".{stage}." in name)
        objective = PerDomainObjective()
        objective.collator(tokenizer, None, max_length=64)
        train(model, records, objective, config, progress=False)
        objective.on_stage_end(model, records)
        objectives.append(objective)
        outputs.append(_logits_under(objectives[0], model, test, tokenizer))
    assert torch.equal(outputs[0], outputs[1])  # domain 0 served exactly as before stage 1 trained
    assert store(model)["domain_adapters"] == {"general": "general", "medical": "medical"}


def _logits_under(objective, model, records, tokenizer):
    previous = tuners.active_adapters(model)
    tuners.set_active(model, [objective.adapter])
    try:
        with torch.no_grad():
            batch = objective.collate_fn(records)
            return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.clone()
    finally:
        tuners.set_active(model, previous)


def test_store_lives_on_the_model_and_copies_with_it():
    model = testing.toy_mlp()
    store(model)["x"] = [1]
    twin = copy.deepcopy(model)
    assert store(twin) == {"x": [1]}
    assert store(testing.toy_mlp()) == {}
    assert "_tunelab_adapt_state" not in dict(model.named_parameters())
    random.seed(0)


# ----------------------------------------------------------------------------- resume across stages
class _Killed(Exception):
    """Stands for SIGKILL in process: nothing after it runs, the scratch folder stays as it was."""


def _kill_in_stage_two(at_step):
    """A training callback that dies at step ``at_step`` of the second stage (before that step's checkpoint)."""
    started = []

    def callback(event):
        if "loss" in event and event.get("step") == 1:
            started.append(True)
        if len(started) == 2 and "loss" in event and event.get("step") == at_step:
            raise _Killed

    return callback


@pytest.mark.parametrize("name, options", [("ewc", {"ewc_lambda": 1e4, "fisher_samples": 4}),
                                           ("ewc", {"ewc_lambda": 1e4, "fisher_samples": 4, "fisher": "true"}),
                                           ("replay", {"buffer_size": 4, "replay_ratio": 0.5}),
                                           ("lwf", {"alpha": 1.0}),
                                           ("olora", {"orth_lambda": 1.0}),
                                           ("per_domain", {})])
def test_a_cell_killed_in_stage_two_resumes_to_the_uninterrupted_result(name, options, small_model_dir, tmp_path,
                                                                        monkeypatch):
    """Killed in stage 2 before its first checkpoint (the stage restarts) or after it (the stage resumes
    mid-way): stage 1's cross-stage state (Fisher + anchor, buffer, snapshot, finished adapters) comes back
    with stage 1, so stages 2 and 3 train, and every stage's test data scores, exactly as in an
    uninterrupted run (per-domain adapters: stage 1's data with stage 1's adapter)."""
    from tunelab.experiments.grid import expand_grid
    from tunelab.experiments.spec import validate

    lora = {"name": "lora", "options": {"r": 2, "target_modules": "all-linear"}}
    raw = {
        "name": "cl", "output_dir": str(tmp_path), "model": {"name": str(small_model_dir)}, "method": lora,
        "objective": {"name": name, "options": options},
        "data": {"tasks": ["qa"], "train_size": 8, "eval_size": 0, "test_size": 2, "max_length": 48},
        "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 3e-2, "save_every": 1, "log_every": 1},
        "eval": {"max_new_tokens": 2, "latency_batches": 0},
        "stages": [{"name": domain, "data": {"domain": domain},
                    **({"method": lora} if name in ("olora", "per_domain") else {})}
                   for domain in ("general", "medical", "legal")],
    }
    cell = expand_grid(validate(raw))[0]
    from tunelab.experiments import runner

    scored_with = []  # the adapters that score each trained stage's test data (per_domain; None = the base)
    evaluate_row = runner._evaluate_row

    def spy(spec, prepared, objectives, index, *args):
        scored_with.extend(o.adapter for o in objectives[: index + 1] if isinstance(o, PerDomainObjective))
        return evaluate_row(spec, prepared, objectives, index, *args)

    monkeypatch.setattr(runner, "_evaluate_row", spy)
    straight = runner.run_cell(cell, tmp_path / "straight", progress=False)
    penalties = {"ewc": "ewc", "replay": "ce_replay", "lwf": "lwf_kd", "olora": "orth", "per_domain": "loss"}
    assert any(penalties[name] in e for e in straight["history"] if e.get("stage") == "medical")
    for at_step in (1, 2):  # 1: no checkpoint of stage 2 yet; 2: its step-1 checkpoint exists
        run_dir = tmp_path / f"killed-at-{at_step}"
        with pytest.raises(_Killed):
            runner.run_cell(cell, run_dir, progress=False, callbacks=[_kill_in_stage_two(at_step)])
        resumed = runner.run_cell(cell, run_dir, progress=False)
        assert [e.get("loss") for e in resumed["history"]] == [e.get("loss") for e in straight["history"]], at_step
        assert resumed["stage_matrix"]["metrics"] == straight["stage_matrix"]["metrics"]
        assert resumed["metrics"] == straight["metrics"]
    assert None not in scored_with  # a restored stage scores its test data with its own adapter
