"""The ``distill`` objective on tiny random teacher/student pairs: the weighted sum, the projector in the
checkpoint with an exact resume, frozen teachers, the disabled-adapter teacher, the vocabulary check,
ensembles, students initialised from teacher layers, and a two-cell ``tunelab run``."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from tunelab import tuners
from tunelab.data import synthetic
from tunelab.distill import losses, teachers
from tunelab.distill.student import init_from_teacher
from tunelab.errors import ConfigError
from tunelab.experiments import registry
from tunelab.models import tiny, zoo
from tunelab.models.hooks import FeatureTap
from tunelab.train import TrainConfig, train

ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gradient_accumulation_steps=1)


def _save(path, tokenizer, hidden, layers, seed):
    spec = tiny.TinySpec(hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                         intermediate_size=2 * hidden, vocab_size=len(tokenizer))
    model = tiny.build_model(spec, tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A student (32 wide, 2 layers) and a teacher (48 wide, 4 layers) sharing a tokenizer; a stranger."""
    root = tmp_path_factory.mktemp("distill-models")
    corpus = synthetic.corpus(domains=synthetic.DOMAINS, n_documents=200, seed=0)
    tokenizer = tiny.train_tokenizer(corpus, 500)
    other = tiny.train_tokenizer(corpus[:60], 300)
    return SimpleNamespace(student=_save(root / "student", tokenizer, 32, 2, 0),
                           teacher=_save(root / "teacher", tokenizer, 48, 4, 1),
                           stranger=_save(root / "stranger", other, 32, 2, 2))


@pytest.fixture(scope="module")
def records():
    return synthetic.make_task("summarization", domain="medical", split="train", n=12, seed=0)


def _objective(tokenizer, **options):
    objective = registry.build_objective("distill", options)
    objective.collator(tokenizer, None, max_length=64)
    return objective


def _student(dirs):
    return zoo.load(str(dirs.student), progress=False)


def test_total_is_the_weighted_sum_of_the_pure_losses(dirs, records):
    student, tokenizer = _student(dirs)
    objective = _objective(tokenizer, teacher=str(dirs.teacher), alpha=0.3, temperature=2.0, loss="reverse_kl",
                           features=[{"student": "model.layers.1", "teacher": "model.layers.3", "weight": 0.5},
                                     {"student": "model.layers.0", "teacher": "model.layers.1", "loss": "cosine"}],
                           relation={"rkd_distance": 0.2, "rkd_angle": 0.3, "similarity": 0.1},
                           value_relation={"weight": 0.7, "relation_heads": 2})
    objective.setup(student, ACCELERATOR)
    batch = objective.collate_fn(records[:4])
    student.train()
    out = objective.loss(student, batch)

    teacher = objective.teachers[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    names_s = ["model.layers.1", "model.layers.0", "model.layers.1.self_attn.v_proj"]
    names_t = ["model.layers.3", "model.layers.1", "model.layers.3.self_attn.v_proj"]
    with FeatureTap(student, names_s) as tap_s:
        s = student(**inputs, output_hidden_states=True)
    with torch.no_grad(), FeatureTap(teacher, names_t) as tap_t:
        t = teacher(**inputs, output_hidden_states=True)
    labels = batch["labels"][:, 1:]
    mask, attention = losses.mask_from_labels(labels), batch["attention_mask"]
    projector = objective.projector

    def pooled(hidden):
        keep = attention[:, :, None].float()
        return (hidden * keep).sum(1) / keep.sum(1)

    expected = {
        "ce": (0.3, losses.hard_label_ce(s.logits[:, :-1], labels)),
        "kd": (0.7, losses.reverse_kl(s.logits[:, :-1], t.logits[:, :-1], 2.0, mask)),
        "feature/model.layers.1->model.layers.3": (0.5, losses.hidden_mse(
            tap_s["model.layers.1"], tap_t["model.layers.3"],
            lambda h: projector("model.layers.1->model.layers.3", h), attention)),
        "feature/model.layers.0->model.layers.1": (1.0, losses.hidden_cosine(
            tap_s["model.layers.0"], tap_t["model.layers.1"],
            lambda h: projector("model.layers.0->model.layers.1", h), attention)),
        "value_relation": (0.7, losses.value_relation(tap_s[names_s[2]], tap_t[names_t[2]], 2, attention)),
        "rkd_distance": (0.2, losses.rkd_distance(pooled(s.hidden_states[-1]), pooled(t.hidden_states[-1]))),
        "rkd_angle": (0.3, losses.rkd_angle(pooled(s.hidden_states[-1]), pooled(t.hidden_states[-1]))),
        "similarity": (0.1, losses.similarity_preserving(pooled(s.hidden_states[-1]), pooled(t.hidden_states[-1]))),
    }
    total = sum(weight * value for weight, value in expected.values())
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)
    for name, (_, value) in expected.items():
        assert out.metrics[name] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name
    assert out.metrics["temperature"] == 2.0 and out.metrics["alpha"] == 0.3
    assert projector.projections["model__layers__1->model__layers__3"].weight.shape == (48, 32)
    out.loss.backward()
    assert projector.projections["model__layers__1->model__layers__3"].weight.grad is not None


def test_teacher_is_frozen_in_eval_mode_and_not_in_the_optimizer(dirs):
    from tunelab.train.engine import build_param_groups

    student, tokenizer = _student(dirs)
    objective = _objective(tokenizer, teacher=str(dirs.teacher),
                           features=[{"student": "model.layers.1", "teacher": "model.layers.3"}])
    objective.setup(student, ACCELERATOR)
    teacher = objective.teachers[0]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    groups = build_param_groups(student, 0.0, None, objective.modules())
    optimized = {id(p) for group in groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in objective.projector.parameters()} <= optimized


def test_vocabulary_mismatch_is_a_one_line_config_error(dirs):
    student, tokenizer = _student(dirs)
    objective = _objective(tokenizer, teacher=str(dirs.stranger))
    with pytest.raises(ConfigError, match="another tokenizer than the student") as error:
        objective.setup(student, ACCELERATOR)
    assert "\n" not in str(error.value)


def test_base_teacher_is_the_disabled_adapter_not_a_copy(dirs, records):
    student, tokenizer = _student(dirs)
    base = copy.deepcopy(student)  # the test's reference only
    tuners.apply(student, "lora", r=4, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # so that the student differs from its base
    objective = _objective(tokenizer, teacher="base", alpha=0.0, temperature=1.5)
    objective.setup(student, ACCELERATOR)
    assert objective.teachers == [None] and objective.modules() == []
    batch = objective.collate_fn(records[:3])
    student.train()
    out = objective.loss(student, batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = losses.forward_kl(student(**inputs).logits[:, :-1], base(**inputs).logits[:, :-1], 1.5,
                                     losses.mask_from_labels(batch["labels"][:, 1:]))
    assert out.metrics["kd"] == pytest.approx(float(expected), rel=1e-5)
    assert out.metrics["kd"] > 1e-4 and student.training  # the teacher pass left the student in train mode
    with pytest.raises(ConfigError, match="has no adapter"):
        _objective(tokenizer, teacher="base").setup(_student(dirs)[0], ACCELERATOR)


def _run(dirs, records, output_dir, stop_at=None, resume=False):
    torch.manual_seed(0)  # LoRA and projector initialisation, as the runner seeds before building
    student, tokenizer = _student(dirs)
    tuners.apply(student, "lora", r=4, target_modules="all-linear")
    objective = _objective(tokenizer, teacher=str(dirs.teacher), alpha={"kind": "linear", "start": 0.8, "end": 0.2},
                           temperature={"kind": "cosine", "start": 3.0, "end": 1.0},
                           features=[{"student": "model.layers.1", "teacher": "model.layers.3"}])
    config = TrainConfig(max_steps=4, batch_size=4, learning_rate=1e-2, save_every=2, log_every=1,
                         eval_every=None, schedule="constant", warmup_ratio=0.0, seed=3)
    callbacks = [lambda event: event.get("step") == stop_at and "loss" in event] if stop_at else None
    result = train(student, records, objective, config, output_dir=output_dir, resume=resume, progress=False,
                   callbacks=callbacks)
    return student, objective, result


def test_projector_trains_checkpoints_and_resume_is_bitwise(dirs, records, tmp_path):
    from safetensors.torch import load_file

    student, objective, result = _run(dirs, records, tmp_path / "straight")
    projector = objective.projector.projections["model__layers__1->model__layers__3"].weight
    _, stopped, partial = _run(dirs, records, tmp_path / "resumed", stop_at=2)
    assert partial.steps == 2 and stopped.calls == 2
    assert not torch.equal(stopped.projector.projections["model__layers__1->model__layers__3"].weight, projector)
    saved = {key for path in (tmp_path / "resumed" / "checkpoint").rglob("*.safetensors") for key in load_file(path)}
    assert any(key.startswith("objective.0.projections") for key in saved)
    resumed_student, resumed, resumed_result = _run(dirs, records, tmp_path / "resumed", resume=True)
    assert resumed.calls == 4
    torch.testing.assert_close(resumed.projector.projections["model__layers__1->model__layers__3"].weight,
                               projector, rtol=0, atol=0)
    for (name, a), (_, b) in zip(student.named_parameters(), resumed_student.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    straight = [e for e in result.history if "loss" in e and e["step"] > 2]
    again = [e for e in resumed_result.history if "loss" in e and e["step"] > 2]
    assert [(e["loss"], e["temperature"], e["alpha"]) for e in straight] == \
        [(e["loss"], e["temperature"], e["alpha"]) for e in again]
    assert straight[-1]["alpha"] == pytest.approx(0.8 + (0.2 - 0.8) * 3 / 4)  # the schedule's step 3


def test_ensembles_mean_confidence_and_task():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    p1, p2 = torch.softmax(first / 2, -1), torch.softmax(second / 2, -1)
    mixed = teachers.mix([first, second], [1.0, 3.0], "mean", temperature=2.0)
    torch.testing.assert_close(torch.softmax(mixed / 2, -1), (p1 + 3 * p2) / 4)
    mixed = teachers.mix([first, second], [1.0, 1.0], "confidence", temperature=2.0)
    c1, c2 = p1.max(-1).values.mean(-1), p2.max(-1).values.mean(-1)  # (B,)
    expected = (c1[:, None, None] * p1 + c2[:, None, None] * p2) / (c1 + c2)[:, None, None]
    torch.testing.assert_close(torch.softmax(mixed / 2, -1), expected)
    from tunelab.distill.options import TeacherSpec

    specs = [TeacherSpec(model="a", tasks=["qa"]), TeacherSpec(model="b")]
    rows = teachers.task_rows(specs, ["summarization", "qa"])
    assert rows == [1, 0]
    mixed = teachers.mix([first, second], [1.0, 1.0], "task", 2.0, rows=rows)
    torch.testing.assert_close(mixed, torch.stack([second[0], first[1]]))


def test_self_distillation_peer_on_policy_and_sequence_level_terms(dirs, records):
    student, tokenizer = _student(dirs)
    objective = _objective(tokenizer, teacher=str(dirs.teacher), self_distill={"layers": [0]},
                           peer={"model": str(dirs.student), "seed": 0}, on_policy=1.0, sequence_level=True,
                           max_new_tokens=3, attention=[{"student_layer": 1, "teacher_layer": 3}])
    objective.setup(student, ACCELERATOR)
    assert objective.modules() == [objective.peer] and all(p.requires_grad for p in objective.peer.parameters())
    student.train()
    out = objective.loss(student, objective.collate_fn(records[:2]))
    assert out.metrics["on_policy"] == 1.0 and len(objective.generations) == 2
    for name in ("ce", "kd", "exit/0", "peer_ce", "mutual_student", "mutual_peer", "attention/1->3"):
        assert name in out.metrics, name
    out.loss.backward()
    assert any(p.grad is not None for p in objective.peer.parameters())


def test_fine_tuned_teacher_is_cached_and_can_learn_from_its_own_teacher(dirs, records, tmp_path, monkeypatch):
    from tunelab.distill.options import TeacherSpec

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    spec = TeacherSpec(model=str(dirs.teacher), finetune={"max_steps": 2, "batch_size": 4, "teacher": str(dirs.teacher)})
    first, _ = teachers.finetuned(spec, records, "plain", 64)  # teacher -> assistant (this one) -> student
    base, _ = zoo.load(str(dirs.teacher), progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), base.parameters(), strict=True))
    assert not any(p.requires_grad for p in first.parameters()) and not first.training
    assert len(list((tmp_path / "distill" / "teachers").iterdir())) == 1
    again, _ = teachers.finetuned(spec, records, "plain", 64)  # from the cache
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))


def test_init_from_teacher_copies_the_chosen_layers(dirs):
    teacher, _ = zoo.load(str(dirs.teacher), progress=False)
    student = init_from_teacher(teacher, every=2)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    for position, source in enumerate([0, 2]):
        for (name, a), (_, b) in zip(student.model.layers[position].state_dict().items(),
                                     teacher.model.layers[source].state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    picked = init_from_teacher(teacher, layers=[3, 1])
    assert torch.equal(picked.model.layers[0].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    ids = torch.tensor([[1, 5, 9]])
    assert picked(input_ids=ids).logits.shape == (1, 3, teacher.config.vocab_size)
    assert len(teacher.model.layers) == 4  # the teacher is untouched
    with pytest.raises(ConfigError, match="not layers of a 4-layer teacher"):
        init_from_teacher(teacher, layers=[4])


def test_options_fail_at_load():
    with pytest.raises(ConfigError, match="alpha"):
        registry.objective_config("distill", {"teacher": "x", "alpha": 1.5})
    with pytest.raises(ConfigError, match="need a teacher"):
        registry.objective_config("distill", {"features": [{"student": "a", "teacher": "b"}]})
    with pytest.raises(ConfigError, match="temprature"):
        registry.objective_config("distill", {"temprature": 2.0})


def test_tunelab_run_of_a_two_cell_distillation_config(dirs, tmp_path):
    from tunelab.cli import main

    config = tmp_path / "distill.yaml"
    config.write_text(f"""
name: kd
output_dir: {tmp_path / 'runs'}
model: {{name: '{dirs.student}'}}
method: {{name: full}}
objective: {{name: distill, options: {{teacher: '{dirs.teacher}', alpha: 0.5, temperature: 2.0,
  features: [{{student: model.layers.1, teacher: model.layers.3, weight: 0.1}}]}}}}
data: {{tasks: [summarization], domain: medical, train_size: 8, eval_size: 0, test_size: 4}}
train: {{max_steps: 2, batch_size: 4, eval_every: null, save_every: null, learning_rate: 1.0e-3}}
eval: {{max_new_tokens: 4, latency_batches: 1}}
grid:
  methods:
    - {{name: full, label: labels-only, overrides: {{objective: {{name: sft}}}}}}
    - {{name: full, label: distilled}}
""")
    assert main(["run", str(config), "--in-process"]) == 0
    run_dir = tmp_path / "runs" / "kd"
    results = {p.stem: json.loads(p.read_text()) for p in (run_dir / "results").glob("*.json")}
    assert set(results) == {"labels-only-n8-s0", "distilled-n8-s0"}
    distilled = results["distilled-n8-s0"]
    assert distilled["objective"] == "distill" and results["labels-only-n8-s0"]["objective"] == "sft"
    for key in ("teacher_score", "retention", "student_parameters", "teacher_parameters", "speedup"):
        assert key in distilled["metrics"], key
    assert distilled["metrics"]["teacher_parameters"] > distilled["metrics"]["student_parameters"]
    assert any("kd" in event for event in distilled["history"])
    report = (run_dir / "report.md").read_text()
    assert "## Distillation" in report and "labels-only" in report
    assert "<h2>Distillation" in (run_dir / "report.html").read_text()


def test_shipped_distillation_config_taps_layers_that_exist():
    """The feature pairs of configs/distillation.yaml name layers the student and teacher presets have."""
    import re

    from tunelab.cli import packaged_config
    from tunelab.experiments.spec import load_spec
    from tunelab.models import tiny

    spec = load_spec(packaged_config("distillation"), [])
    pairs = 0
    for method in spec.grid.methods:
        overrides = method.overrides or {}
        kept = overrides.get("model.layers")  # a student cut from tiny-llama's layers
        depth = {"student": len(kept) if kept else tiny.PRESETS["tiny-llama"].num_layers,
                 "teacher": tiny.PRESETS["tiny-llama-teacher"].num_layers}
        for pair in overrides.get("objective.options.features", []):
            pairs += 1
            for side, limit in depth.items():
                index = int(re.fullmatch(r"model\.layers\.(\d+)", pair[side]).group(1))
                assert index < limit, (method.display, pair, side, limit)
        assert all(i < tiny.PRESETS["tiny-llama"].num_layers for i in kept or [])
    assert pairs


def test_model_layers_trains_a_student_cut_from_a_bigger_model(dirs, tmp_path, capsys):
    """``model: {layers: [...]}`` trains (and keys, and reports) the student init_from_teacher builds; the
    ``tunelab student`` command writes the same student as a directory; ``generate --layers`` loads it."""
    from tunelab.cli import main
    from tunelab.experiments.grid import cell_key, expand_grid
    from tunelab.experiments.spec import ModelSpec, load_spec

    config = tmp_path / "cut.yaml"
    config.write_text(f"""
name: cut
output_dir: {tmp_path / 'runs'}
model: {{name: '{dirs.teacher}', layers: [0, 3]}}
method: {{name: full}}
data: {{tasks: [summarization], domain: medical, train_size: 8, eval_size: 0, test_size: 4}}
train: {{max_steps: 2, batch_size: 4, eval_every: null, save_every: null, learning_rate: 1.0e-3}}
eval: {{max_new_tokens: 4, latency_batches: 1}}
""")
    assert main(["run", str(config), "--in-process"]) == 0
    result = json.loads(next((tmp_path / "runs" / "cut" / "results").glob("*.json")).read_text())
    teacher, _ = zoo.load(str(dirs.teacher), progress=False)
    cut = init_from_teacher(teacher, layers=[0, 3])
    assert result["trainable_parameters"] == sum(p.numel() for p in cut.parameters())
    assert result["config"]["model"]["layers"] == [0, 3]
    # the cell key sees the layers; a spec without them keeps the key it had before the field existed
    cell = expand_grid(load_spec(config, []))[0]
    whole = expand_grid(load_spec(config, ["model.layers=null"]))[0]
    assert cell_key(cell) != cell_key(whole) and "layers" not in ModelSpec(name="x").identity()
    # the same student as a directory, and generation with the run's adapter on the cut model
    assert main(["student", str(dirs.teacher), str(tmp_path / "half"), "--layers", "0,3"]) == 0
    written, _ = zoo.load(str(tmp_path / "half"), progress=False)
    assert written.config.num_hidden_layers == 2
    assert torch.equal(written.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert main(["student", str(dirs.teacher), str(tmp_path / "half"), "--every", "2"]) == 2  # exists: refused (a config error)
    assert "already exists" in capsys.readouterr().err
    adapter = tmp_path / "runs" / "cut" / result["outputs"]["adapter"]
    assert main(["generate", "--model", str(dirs.teacher), "--layers", "0,3", "--adapter", str(adapter),
                 "--max-new-tokens", "2", "hello"]) == 0
    with pytest.raises(ConfigError, match="not layers of a 4-layer"):
        from tunelab.experiments.preflight import load_model
        load_model(load_spec(config, ["model.layers=[7]"]), "causal_lm", None, progress=False)


def test_report_measures_each_student_against_the_labels_only_cell_of_its_size():
    """Two student sizes in one run: each distilled student's gain is over the labels-only cell with its
    own parameter count (a cut 2-layer student is not credited with the 4-layer baseline's score), with
    the 95% CI of the difference when both have seeds."""
    from tunelab.distill.report import markdown_section

    def result(label, objective, score, parameters, seed):
        metrics = {"score": score}
        if objective == "distill":
            metrics |= {"teacher_score": 0.5, "teacher_parameters": 1000, "student_parameters": parameters,
                        "teacher_latency_ms": 4.0, "student_latency_ms": 2.0, "speedup": 2.0}
        return {"method_label": label, "objective": objective, "total_parameters": parameters,
                "inference_latency_ms": 2.0, "metrics": metrics, "seed": seed}

    results = []
    for seed, noise in enumerate((-0.01, 0.0, 0.01)):
        results += [result("big-labels", "sft", 0.40 + noise, 500, seed),
                    result("big-kd", "distill", 0.45 + noise, 500, seed),
                    result("small-labels", "sft", 0.20 + noise, 250, seed),
                    result("small-kd", "distill", 0.30 + noise, 250, seed)]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in markdown_section(results).splitlines()
             if line.startswith("| ")}
    assert " +0.0500 ± " in lines["big-kd"] and " +0.1000 ± " in lines["small-kd"]
    assert "+0.2" not in lines["small-labels"] and "| – |" in lines["small-labels"]
    from tunelab.distill.report import plots

    png = plots(results)["distillation"]  # teacher vs students: linked from the section, a real PNG
    assert png.startswith(b"\x89PNG") and "plots/distillation.png" in markdown_section(results)
    assert plots([r for r in results if r["objective"] == "sft"]) == {}
