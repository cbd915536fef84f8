"""The ``distill_classification`` objective on tiny random BERT classifiers (no downloads): Hinton's loss on
class logits by hand, the frozen teacher, the label-set check, the fine-tuned classifier teacher's cache,
students cut from BERT's layers, a two-cell ``tunelab run`` with its report, and the shipped MiniLM config."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from tunelab.data import synthetic
from tunelab.distill import losses, teachers
from tunelab.distill.options import TeacherSpec
from tunelab.distill.student import init_from_teacher
from tunelab.errors import ConfigError
from tunelab.experiments import registry
from tunelab.models import tiny, zoo
from tunelab.models.hooks import FeatureTap

ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gradient_accumulation_steps=1)
LABELS = sorted(synthetic.DOMAINS)  # the labels of domain_classification over every domain, as the runner sorts them


def _save(path: Path, tokenizer, hidden: int, layers: int, seed: int, labels=LABELS) -> str:
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
                        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A 2-layer student (32 wide), a 4-layer teacher (48 wide) and a teacher of other labels, one tokenizer."""
    root = tmp_path_factory.mktemp("distill-classifiers")
    tokenizer = tiny.train_tokenizer(synthetic.corpus(domains=synthetic.DOMAINS, n_documents=100, seed=0), 300)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return SimpleNamespace(student=_save(root / "student", tokenizer, 32, 2, 0),
                           teacher=_save(root / "teacher", tokenizer, 48, 4, 1),
                           other=_save(root / "other", tokenizer, 48, 4, 1, labels=["negative", "positive"]))


@pytest.fixture(scope="module")
def records():
    return synthetic.make_task("domain_classification", domain=list(synthetic.DOMAINS), split="train", n=16, seed=0)


def _objective(tokenizer, **options):
    objective = registry.build_objective("distill_classification", options)
    objective.collator(tokenizer, LABELS, max_length=48)
    return objective


def _student(dirs):
    return zoo.load(dirs.student, task="sequence_classification", progress=False)


class FixedLogits(nn.Module):
    """A stand-in classifier whose (B, C) logits are given: the equation check needs no model."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids, attention_mask, **_):
        return SimpleNamespace(logits=self.logits)


def test_loss_is_alpha_ce_plus_t_squared_kl_on_fixed_logits():
    """At T = 2 the teacher logits (2 ln 3, 0) give p_T = (3/4, 1/4) and the student's (0, 0) give (1/2, 1/2):
    KL = 3/4 ln(3/2) + 1/4 ln(1/2), CE = ln 2 for either label, so L = α ln 2 + (1 − α) · 4 · KL."""
    objective = registry.build_objective("distill_classification", {"teacher": "unused", "alpha": 0.25,
                                                                    "temperature": 2.0})
    student = FixedLogits(torch.zeros(2, 2))
    objective.teacher = FixedLogits(torch.tensor([[2 * math.log(3), 0.0], [0.0, 2 * math.log(3)]]))
    objective.prepared = True
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3),
             "labels": torch.tensor([0, 1])}
    out = objective.loss(student.train(), batch)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.1308..., the same for both rows
    assert out.metrics["ce"] == pytest.approx(math.log(2), rel=1e-6)
    assert out.metrics["kd"] == pytest.approx(4 * kl, rel=1e-6)  # T² · KL, the term logged unweighted
    assert out.loss.item() == pytest.approx(0.25 * math.log(2) + 0.75 * 4 * kl, rel=1e-6)
    assert (out.metrics["temperature"], out.metrics["alpha"]) == (2.0, 0.25)
    out.loss.backward()  # ∂L/∂z_S = α (p_S − onehot) / B + (1 − α) T (p_S(T) − p_T) / B
    expected = 0.25 * torch.tensor([[-0.5, 0.5], [0.5, -0.5]]) / 2 + 0.75 * 2 * torch.tensor(
        [[-0.25, 0.25], [0.25, -0.25]]) / 2
    torch.testing.assert_close(student.logits.grad, expected)


def test_loss_on_bert_is_the_hand_computed_sum_with_a_feature_term(dirs, records):
    student, tokenizer = _student(dirs)
    objective = _objective(tokenizer, teacher=dirs.teacher, alpha=0.3, temperature=3.0,
                           features=[{"student": "bert.encoder.layer.1", "teacher": "bert.encoder.layer.3",
                                      "weight": 0.5}])
    objective.setup(student, ACCELERATOR)
    teacher = objective.teacher
    with torch.no_grad():
        teacher.classifier.weight.mul_(40)  # a confident teacher: the soft term is far from zero
        teacher.classifier.bias.copy_(torch.tensor([6.0, 0.0, -6.0, 3.0]))
    batch = objective.collate_fn(records[:6])
    student.train()
    out = objective.loss(student, batch)

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with FeatureTap(student, ["bert.encoder.layer.1"]) as tap_s:
        z_s = student(**inputs).logits  # (B, C)
    with torch.no_grad(), FeatureTap(teacher, ["bert.encoder.layer.3"]) as tap_t:
        z_t = teacher(**inputs).logits
    y, temperature = batch["labels"], 3.0
    ce = -torch.log_softmax(z_s, -1).gather(1, y[:, None]).mean()
    p_t = torch.softmax(z_t / temperature, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(z_s / temperature, -1))).sum(-1).mean()
    feature = losses.hidden_mse(tap_s["bert.encoder.layer.1"], tap_t["bert.encoder.layer.3"],
                                lambda h: objective.projector("bert.encoder.layer.1->bert.encoder.layer.3", h),
                                batch["attention_mask"])
    assert kl > 0.05
    torch.testing.assert_close(out.loss, 0.3 * ce + 0.7 * temperature**2 * kl + 0.5 * feature, rtol=1e-5, atol=1e-6)
    assert out.metrics["kd"] == pytest.approx((temperature**2 * kl).item(), rel=1e-5)
    assert out.metrics["feature/bert.encoder.layer.1->bert.encoder.layer.3"] == pytest.approx(feature.item(), rel=1e-5)


def test_teacher_is_frozen_in_eval_mode_and_not_in_the_optimizer(dirs, records):
    from tunelab.train.engine import build_param_groups

    student, tokenizer = _student(dirs)
    objective = _objective(tokenizer, teacher=dirs.teacher,
                           features=[{"student": "bert.encoder.layer.1", "teacher": "bert.encoder.layer.3"}])
    objective.setup(student, ACCELERATOR)
    teacher = objective.teacher
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    groups = build_param_groups(student, 0.0, None, objective.modules())
    optimized = {id(p) for group in groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in objective.projector.parameters()} <= optimized
    optimizer = torch.optim.AdamW([p for group in groups for p in group["params"]], lr=1e-2)
    student.train()
    objective.loss(student, objective.collate_fn(records[:4])).loss.backward()
    optimizer.step()
    assert not teacher.training and all(torch.equal(before[n], v) for n, v in teacher.state_dict().items())


def test_label_set_mismatch_is_a_one_line_config_error(dirs):
    student, tokenizer = _student(dirs)
    with pytest.raises(ConfigError, match="predicts the labels") as error:
        _objective(tokenizer, teacher=dirs.other).setup(student, ACCELERATOR)
    assert "\n" not in str(error.value) and "['negative', 'positive']" in str(error.value)
    objective = registry.build_objective("distill_classification", {"teacher": dirs.teacher})
    objective.collator(tokenizer, list(reversed(LABELS)), max_length=48)  # the same names in another order
    with pytest.raises(ConfigError, match="one label set in one order"):
        objective.setup(student, ACCELERATOR)


def test_options_fail_at_load():
    with pytest.raises(ConfigError, match="teacher"):
        registry.objective_config("distill_classification", {"alpha": 0.5})
    with pytest.raises(ConfigError, match="alpha"):
        registry.objective_config("distill_classification", {"teacher": "x", "alpha": 1.5})
    with pytest.raises(ConfigError, match="not supported for classification"):
        registry.objective_config("distill_classification", {"teacher": "base"})
    with pytest.raises(ConfigError, match="valid options"):
        registry.objective_config("distill_classification", {"teacher": "x", "loss": "reverse_kl"})


def test_fine_tuned_classifier_teacher_is_cached_by_content_and_labels(dirs, records, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    spec = TeacherSpec(model=dirs.teacher, finetune={"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2})
    first, _ = teachers.finetuned(spec, records, "plain", 48, labels=LABELS)
    base, _ = zoo.load(dirs.teacher, task="sequence_classification", progress=False)
    assert isinstance(first, BertForSequenceClassification) and [first.config.id2label[i] for i in range(4)] == LABELS
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), base.parameters(), strict=True))
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    again, _ = teachers.finetuned(spec, records, "plain", 48, labels=LABELS)  # from the cache
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert len(list((tmp_path / "distill" / "teachers").iterdir())) == 1
    relabelled = [{**r, "label": LABELS[0]} for r in records]  # same texts, other labels: another teacher
    assert teachers.cache_key(spec, relabelled, "plain", 48, LABELS) != teachers.cache_key(spec, records, "plain", 48,
                                                                                          LABELS)


def test_init_from_teacher_cuts_bert_layers(dirs):
    teacher, _ = zoo.load(dirs.teacher, task="sequence_classification", progress=False)
    student = init_from_teacher(teacher, layers=[0, 3])
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    assert torch.equal(student.bert.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[3].output.dense.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert [m.layer_idx for m in student.modules() if hasattr(m, "layer_idx")] == [0, 1]  # BERT's attention.self
    ids = torch.tensor([[1, 5, 9]])
    assert student(input_ids=ids).logits.shape == (1, len(LABELS)) and len(teacher.bert.encoder.layer) == 4


def test_tunelab_run_of_labels_only_and_distilled_classifier_cells(dirs, tmp_path, monkeypatch):
    from tunelab.cli import main

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    config = tmp_path / "kd.yaml"
    config.write_text(f"""
name: kdcls
output_dir: {tmp_path / 'runs'}
model: {{name: '{dirs.teacher}', layers: [0, 3]}}
method: {{name: full}}
objective: {{name: classification}}
data: {{tasks: [domain_classification], domain: all, train_size: 4, eval_size: 0, test_size: 4, max_length: 48}}
train: {{max_steps: 2, batch_size: 4, eval_every: null, save_every: null, learning_rate: 1.0e-3}}
eval: {{latency_batches: 1}}
grid:
  methods:
    - {{name: full, label: labels-only}}
    - name: full
      label: distilled
      overrides:
        objective: {{name: distill_classification, options: {{alpha: 0.5, temperature: 2.0,
          teacher: {{model: '{dirs.teacher}', finetune: {{max_steps: 2, batch_size: 4}}}}}}}}
""")
    assert main(["run", str(config), "--in-process"]) == 0
    run_dir = tmp_path / "runs" / "kdcls"
    results = {p.stem: json.loads(p.read_text()) for p in (run_dir / "results").glob("*.json")}
    distilled, labels_only = results["distilled-n4-s0"], results["labels-only-n4-s0"]
    assert (distilled["objective"], labels_only["objective"]) == ("distill_classification", "classification")
    for key in ("teacher_score", "retention", "speedup", "student_parameters", "teacher_parameters", "accuracy"):
        assert key in distilled["metrics"], key
    assert distilled["metrics"]["teacher_parameters"] > distilled["metrics"]["student_parameters"]
    assert {"ce", "kd", "temperature", "alpha"} <= set(next(e for e in distilled["history"] if "loss" in e))
    assert len(list((tmp_path / "home" / "distill" / "teachers").iterdir())) == 1
    report = (run_dir / "report.md").read_text()
    section = report[report.index("## Distillation"):]
    assert "Baseline: **labels-only** (objective `classification`" in section
    assert "| distilled | distill_classification |" in section
    assert "<h2>Distillation" in (run_dir / "report.html").read_text()


def test_shipped_minilm_config_validates_expands_and_reads_sst2(monkeypatch):
    """configs/distillation_minilm.yaml: the teacher-sized reference, the cut student on labels and distilled;
    with the shared data present, its column mapping yields SST-2's two labels."""
    from tunelab.cli import packaged_config
    from tunelab.experiments.grid import expand_grid
    from tunelab.experiments.spec import load_spec

    spec = load_spec(packaged_config("distillation_minilm"), [])
    cells = {cell.method_label: cell.spec for cell in expand_grid(spec)}
    assert set(cells) == {"teacher-alone", "student-labels-only", "student-distilled"}
    assert cells["teacher-alone"].model.layers is None
    assert cells["student-labels-only"].model.layers == cells["student-distilled"].model.layers == [0, 2, 5]
    assert cells["student-distilled"].objective.name == "distill_classification"
    assert cells["student-distilled"].objective.options["teacher"]["model"] == "minilm"
    root = Path(__file__).resolve().parents[1]  # the config's data path is relative to the repository root
    if not (root / spec.data.source).is_file():
        pytest.skip(f"{spec.data.source} is not here")
    monkeypatch.chdir(root)
    from tunelab.experiments.data import build_splits

    train, _, test, labels = build_splits(spec.data.model_copy(update={"train_size": 50, "test_size": 20}), "label")
    assert labels == ["0", "1"] and len(train) == 50 and len(test) == 20
    assert all(isinstance(r["text"], str) and r["text"] for r in train)
