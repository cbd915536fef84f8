"""Domain adaptation: CL metrics on hand-made matrices, in-context prompts, KD to a general teacher, the
DAPT corpus, the router, the transfer matrix, and a tiny staged ``tunelab run`` with replay."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab import tuners
from tunelab.adapt import metrics
from tunelab.adapt.icl import ICLObjective, with_demonstrations
from tunelab.adapt.kd import DomainKDObjective
from tunelab.train import TrainConfig, train


class _Acc:
    device = torch.device("cpu")


# ----------------------------------------------------------------------------- metrics
R = [[0.9, 0.2, 0.1],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.9]]
BASE = [0.1, 0.1, 0.2]


def test_metrics_on_a_hand_made_matrix():
    assert metrics.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert metrics.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert metrics.forward_transfer(R, BASE) == pytest.approx(((0.2 - 0.1) + (0.3 - 0.2)) / 2)
    assert metrics.forgetting(R) == pytest.approx([0.9 - 0.5, 0.8 - 0.7])
    assert metrics.average_forgetting(R) == pytest.approx(0.25)
    assert metrics.forward_transfer(R, None) is None


def test_forgetting_takes_the_best_earlier_score_and_can_differ_from_bwt():
    improving = [[0.5, 0.0], [0.7, 0.6]]  # the first domain got better: BWT > 0, no forgetting
    assert metrics.backward_transfer(improving) == pytest.approx(0.2)
    assert metrics.average_forgetting(improving) == pytest.approx(-0.2)
    peak = [[0.5, 0, 0], [0.9, 0.5, 0], [0.6, 0.5, 0.5]]  # peak 0.9 after stage 1, final 0.6
    assert metrics.forgetting(peak)[0] == pytest.approx(0.3)


def test_summary_with_untuned_scores_or_a_base_stage():
    with_base = [[0.1, 0.1, 0.1, 0.2]] + [[0.0] + row for row in R]
    with_base[1][0] = with_base[2][0] = with_base[3][0] = 0.0
    names = ["base", "a", "b", "c"]
    by_stage = metrics.summary(names, with_base)
    by_untuned = metrics.summary(["a", "b", "c"], R, untuned=BASE)
    for key in ("acc", "bwt", "fwt", "forgetting", "final_in_domain"):
        assert by_stage[key] == pytest.approx(by_untuned[key]), key
    assert by_untuned["fwt"] == pytest.approx(0.1) and by_untuned["stages"] == 3
    with pytest.raises(ValueError):
        metrics.average_accuracy([[1.0, 2.0]])


# ----------------------------------------------------------------------------- in-context prompts
def _records(task="qa", domain="medical", split="train", n=6):
    from tunelab.data import synthetic

    return synthetic.make_task(task, domain=domain, split=split, n=n, seed=0)


def test_demonstrations_are_same_task_seeded_and_prefix_the_prompt():
    pool = _records() + _records("summarization")
    tests = _records(split="test", n=3)
    shots = with_demonstrations(tests, pool, k=2, seed=0)
    assert shots == with_demonstrations(tests, pool, k=2, seed=0)
    for original, prompted in zip(tests, shots, strict=True):
        assert prompted["prompt"].endswith(original["prompt"]) and prompted["response"] == original["response"]
        used = [d for d in pool if d["response"] in prompted["prompt"]]
        assert len(used) >= 2 and all(d["task"] == "qa" for d in used[:2])
    assert with_demonstrations(tests, pool, k=0, seed=0) == tests


def test_demonstrations_become_earlier_chat_turns_under_a_chat_template():
    from tunelab.data.templates import render_prompt
    from tunelab.eval.tasks import reference_text

    pool, tests = _records(), _records(split="test", n=2)
    shots = with_demonstrations(tests, pool, k=2, seed=0, template="chatml")
    plain = with_demonstrations(tests, pool, k=2, seed=0)
    for original, chat, flat in zip(tests, shots, plain, strict=True):
        roles = [m["role"] for m in chat["messages"]]
        assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
        assert chat["messages"][-2]["content"] == original["prompt"] and reference_text(chat) == original["response"]
        # the same two demonstrations as the plain layout, each as its own turn pair
        assert all(m["content"].strip() in flat["prompt"] for m in chat["messages"][:4])
        prompt = render_prompt(chat, "chatml")
        assert prompt.count("<|im_start|>user") == 3 and prompt.endswith("<|im_start|>assistant\n")
        assert "<|im_start|>" not in chat["messages"][-2]["content"]  # the template is not nested


def test_icl_training_is_a_no_op(small_model_dir):
    from tunelab.models import zoo

    model, tokenizer = zoo.load(str(small_model_dir), progress=False)
    tuners.apply(model, "full")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = ICLObjective(k=1)
    objective.collator(tokenizer, None, max_length=64)
    train(model, _records(n=4), objective, TrainConfig(max_steps=1, batch_size=2, weight_decay=0.1), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(objective.pool) == 4
    scores = objective.evaluate(model, _records(split="test", n=2), max_new_tokens=2, progress=False)
    assert "score" in scores


# ----------------------------------------------------------------------------- KD to a general teacher
def test_domain_kd_is_zero_at_the_start_and_plain_sft_at_weight_zero(small_model_dir):
    from tunelab.models import zoo

    model, tokenizer = zoo.load(str(small_model_dir), progress=False)
    tuners.apply(model, "lora", r=2, target_modules="all-linear")
    objective = DomainKDObjective(general_size=4, kd_batch_size=2, general_tasks=["qa"])
    objective.collator(tokenizer, None, max_length=64)
    objective.setup(model, _Acc())
    batch = objective.collate_fn(_records(n=2))
    model.train()
    out = objective.loss(model, batch)
    assert out.metrics["kd"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: student == base teacher
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    assert objective.loss(model, batch).metrics["kd"] > 0
    plain = DomainKDObjective(kd_weight=0)
    plain.collator(tokenizer, None, max_length=64)
    plain.setup(model, _Acc())
    assert float(plain.loss(model, batch).loss.detach()) == pytest.approx(float(model(**batch).loss.detach()))
    full, _ = zoo.load(str(small_model_dir), progress=False)
    tuners.apply(full, "full")
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher: initial"):
        DomainKDObjective(general_size=2).setup(full, _Acc())
    initial = DomainKDObjective(general_size=2, general_tasks=["qa"], teacher="initial")
    initial.collator(tokenizer, None, max_length=64)
    initial.setup(full, _Acc())
    assert initial.teacher is not None and not any(p.requires_grad for p in initial.teacher.parameters())


# ----------------------------------------------------------------------------- data, router, analysis
def test_corpus_pseudo_task_gives_text_records():
    from tunelab.experiments.data import build_splits
    from tunelab.experiments.spec import DataSpec

    train_records, _, test, labels = build_splits(DataSpec(tasks=["corpus"], domain="legal", train_size=5,
                                                           eval_size=0, test_size=3))
    assert len(train_records) == 5 and len(test) == 3 and labels is None
    assert all(set(r) >= {"text", "domain"} and r["domain"] == "legal" for r in train_records)


def test_router_learns_domains_and_routes_to_adapters(small_model_dir):
    from tunelab.adapt.router import RouterObjective
    from tunelab.adapt.store import store
    from tunelab.models import zoo

    model, tokenizer = zoo.load(str(small_model_dir), progress=False)
    for domain in ("general", "legal"):
        tuners.apply(model, "lora", r=2, target_modules="all-linear", adapter_name=domain)
    store(model)["domain_adapters"] = {"general": "general", "legal": "legal"}
    task = "summarization"  # qa's test split holds out phrasings: a router trained on qa would learn the phrasing
    records = _records(task, domain="general", n=16) + _records(task, domain="legal", n=16)
    objective = RouterObjective(domains=["general", "legal"])
    objective.collator(tokenizer, None, max_length=64)
    train(model, records, objective, TrainConfig(max_steps=30, batch_size=8, learning_rate=5e-2), progress=False)
    tests = _records(task, domain="general", split="test", n=6) + _records(task, domain="legal", split="test", n=6)
    result = objective.evaluate(model, tests, max_new_tokens=2, progress=False)
    assert result["routing_accuracy"] >= 0.8, result
    assert set(result) >= {"score", "oracle_score", "routed_vs_oracle"}


def test_transfer_matrix_from_probe_results():
    from tunelab.adapt.analysis import transfer_matrices

    def result(domain, score, probes):
        return {"method_label": "lora", "config": {"data": {"domain": domain}},
                "metrics": {"score": score, "qa/score": score, **{f"{d}/score": v for d, v in probes.items()}}}

    results = [result("medical", 0.8, {"general": 0.3, "legal": 0.2}),
               result("legal", 0.7, {"general": 0.25, "medical": 0.1})]
    trained, tested, values = transfer_matrices(results)["lora"]
    assert trained == ["medical", "legal"] and tested == ["general", "medical", "legal"]
    assert values == [[0.3, 0.8, 0.2], [0.25, 0.1, 0.7]]


# ----------------------------------------------------------------------------- the runner, end to end
def test_tiny_two_stage_run_with_replay_writes_the_stage_matrix(small_model_dir, tmp_path):
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import validate

    raw = {
        "name": "cl", "output_dir": str(tmp_path), "model": {"name": str(small_model_dir)},
        "method": {"name": "lora", "options": {"r": 2, "target_modules": "all-linear"}},
        "objective": {"name": "replay", "options": {"buffer_size": 4, "replay_ratio": 0.5}},
        "data": {"tasks": ["qa"], "train_size": 8, "eval_size": 0, "test_size": 3, "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "save_every": None, "log_every": 1},
        "eval": {"max_new_tokens": 3, "cross_stages": "all", "latency_batches": 0},
        "stages": [{"name": "general", "data": {"domain": "general"}},
                   {"name": "medical", "data": {"domain": "medical"}}],
    }
    results = run_experiment(validate(raw), progress=False, isolate=False)
    matrix = results[0]["stage_matrix"]
    assert matrix["stages"] == ["general", "medical"]
    assert all(v is not None for row in matrix["scores"] for v in row)
    assert any("ce_replay" in event for event in results[0]["history"] if event.get("stage") == "medical")
    report = (tmp_path / "cl" / "report.md").read_text()
    assert "Continual learning" in report and "forgetting" in report
    page = (tmp_path / "cl" / "report.html").read_text()
    assert "Continual learning" in page and 'alt="stage_matrix"' in page
    assert json.loads((tmp_path / "cl" / "results" / f"{results[0]['run_id']}.json").read_text())["stage_matrix"]


def test_real_domain_files_load_as_records(shared_dir, tmp_path):
    from tunelab.adapt.real import prepare
    from tunelab.experiments.data import build_splits
    from tunelab.experiments.spec import DataSpec

    written = prepare(shared_dir / "data", tmp_path)
    train_records, _, test, labels = build_splits(
        DataSpec(source=str(written["pubmedqa"]), train_size=20, eval_size=0, test_size=10), "label")
    assert labels == ["maybe", "no", "yes"] and len(train_records) == 20 and len(test) == 10
    assert train_records[0]["response"] in labels and train_records[0]["prompt"]
    _, _, _, cuad = build_splits(DataSpec(source=str(written["cuad_governing_law"]), train_size=20, eval_size=0,
                                          test_size=10), "label")
    assert cuad == ["No", "Yes"]
    medquad, _, _, none = build_splits(DataSpec(source=str(written["medquad"]), train_size=5, eval_size=0,
                                                test_size=5))
    assert none is None and medquad[0]["kind"] == "generation"


def test_file_records_take_their_domain_from_a_column_or_their_stage(small_model_dir, tmp_path):
    """Real files as domains: a ``domain`` column wins, else the stage's data.domain, else general; per-domain
    adapters and the router then see the right domains (a manifest declares one domain per file)."""
    from tunelab.experiments.preflight import stage_splits as _stage_splits
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import resolve_stages, validate

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    medical = write("med.jsonl", [{"prompt": f"Which dose of aspirin for patient {i}?", "response": f"{i} mg."}
                                  for i in range(16)])
    legal = write("law.jsonl", [{"prompt": f"Which clause of contract {i} applies?", "response": f"Clause {i}.",
                                 "domain": "legal"} for i in range(16)])
    manifest = tmp_path / "both.yaml"
    manifest.write_text(f"tasks:\n  - {{task: med, source: {medical}, domain: medical}}\n"
                        f"  - {{task: law, source: {legal}}}\n")
    raw = {
        "name": "files", "output_dir": str(tmp_path / "runs"), "model": {"name": str(small_model_dir)},
        "method": {"name": "lora", "options": {"r": 2, "target_modules": "all-linear"}},
        "objective": {"name": "per_domain"},
        "data": {"source": medical, "train_size": 8, "eval_size": 0, "test_size": 4, "max_length": 48},
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "save_every": None, "log_every": 1},
        "eval": {"max_new_tokens": 2, "latency_batches": 0},
        "stages": [
            {"name": "med", "data": {"domain": "medical"}, "method": {"name": "lora", "options": {"r": 2}}},
            {"name": "law", "data": {"source": legal}, "method": {"name": "lora", "options": {"r": 2}}},
            {"name": "plain", "data": {"source": write("plain.jsonl", [{"prompt": "a", "response": "b"}] * 12)},
             "method": {"name": "lora", "options": {"r": 2}}},
            {"name": "route", "data": {"source": str(manifest), "train_size": 24, "test_size": 8},
             "objective": {"name": "router", "options": {"domains": ["medical", "legal", "general"]}},
             "train": {"max_steps": 30, "batch_size": 8, "learning_rate": 5e-2}},
        ],
    }
    spec = validate(raw)
    domains = [{r["domain"] for split in _stage_splits(stage)[1][:3] for r in split} for stage in resolve_stages(spec)]
    assert domains == [{"medical"}, {"legal"}, {"general"}, {"medical", "legal"}]
    [result] = run_experiment(spec, progress=False, isolate=False)
    route = result["stages"][-1]["metrics"]
    assert route["routing_accuracy"] >= 0.75, route


def test_continual_metrics_only_for_stage_sequences_of_one_objective():
    """ACC/BWT/forgetting average R over stages: a DAPT (lm, score = -loss) -> fine-tuning cell or an
    SFT -> DPO pipeline gets no continual-learning row; a domain sequence (router stage aside) does."""
    from tunelab.experiments import report_stages

    def result(label, objectives, names):
        scores = [[0.5 if j <= i else None for j in range(len(names))] for i in range(len(names))]
        return {"method_label": label, "metrics": {"score": 0.5},
                "stages": [{"name": n, "objective": o, "metrics": {"score": 0.5}}
                           for n, o in zip(names, objectives, strict=True)],
                "stage_matrix": {"stages": names, "scores": scores}}

    results = [result("replay", ["replay", "replay"], ["general", "medical"]),
               result("per-domain", ["per_domain", "per_domain", "router"], ["general", "medical", "route"]),
               result("dapt+ft", ["lm", "sft"], ["dapt", "ft"]),
               result("pipeline", ["sft", "dpo"], ["sft", "preference"])]
    assert report_stages.domain_sequences(results) == {"replay", "per-domain"}
    section = report_stages.adapt_section(results, report_stages.stage_matrices(results))
    rows = [line.split(" | ")[0].strip("| ") for line in section.splitlines() if line.startswith("| ")]
    assert "replay" in rows and "per-domain" in rows
    assert "dapt+ft" not in rows and "pipeline" not in rows
