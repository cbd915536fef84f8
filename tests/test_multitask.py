"""Multi-task learning: options, mixed batches, per-row routing, sampling resume, adding a task, Δp, a run."""

from __future__ import annotations

import copy
import json
import shutil
from unittest import mock

import pytest
import torch

from tunelab import tuners
from tunelab.data import synthetic
from tunelab.errors import ConfigError, MethodError, ModelError
from tunelab.experiments import registry
from tunelab.models import testing, tiny
from tunelab.multitask import (
    MultitaskObjective,
    MultitaskOptions,
    add_task,
    attached_heads,
    delta_p,
    load_heads,
    row_adapters,
    saved_options,
)
from tunelab.multitask.analysis import task_metrics, transfer_matrix
from tunelab.multitask.collate import MultitaskCollator, SpanQACollator
from tunelab.train import train

TASKS = [{"name": "qa", "group": "gen"}, {"name": "domain", "match": {"task": "domain_classification"}, "group": "und"},
         {"name": "ner", "group": "und"}, {"name": "extractive_qa", "group": "und"}]


@pytest.fixture(scope="module")
def backbone():
    tokenizer = tiny.train_tokenizer(synthetic.corpus(domains=synthetic.DOMAINS, n_documents=200, seed=0), 500)
    spec = tiny.TinySpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = tiny.build_model(spec, tokenizer, seed=0)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model, tokenizer


@pytest.fixture(scope="module")
def records():
    out = []
    for task in ("qa", "domain_classification", "ner", "extractive_qa"):
        out += synthetic.make_task(task, domain=["medical", "legal"], n=8)
    return out


def test_options_infer_kinds_and_labels_and_reject_mistakes():
    options = MultitaskOptions(tasks=TASKS)
    kinds = {t.name: t.kind for t in options.tasks}
    assert kinds == {"qa": "generation", "domain": "classification", "ner": "token_classification",
                     "extractive_qa": "extractive_qa"}
    assert options.tasks[1].labels == synthetic.label_names("domain_classification")
    with pytest.raises(ConfigError, match="kind"):
        registry.objective_config("multitask", {"tasks": [{"name": "sentiment"}]})
    with pytest.raises(ConfigError, match="labels"):
        registry.objective_config("multitask", {"tasks": [{"name": "s", "kind": "classification"}]})
    with pytest.raises(ConfigError, match="train_tasks"):
        registry.objective_config("multitask", {"tasks": TASKS, "train_tasks": ["nope"]})
    with pytest.raises(ConfigError, match="weighting"):
        registry.objective_config("multitask", {"tasks": TASKS, "weighting": "magic"})
    with pytest.raises(ConfigError, match="shareing"):
        registry.objective_config("multitask", {"tasks": TASKS, "shareing": "hard"})


def test_mixed_batch_layout_and_span_labels(backbone, records):
    _, tokenizer = backbone
    options = MultitaskOptions(tasks=TASKS)
    batch = MultitaskCollator(options.tasks, tokenizer, max_length=128)(records[::4])
    size, length = batch["input_ids"].shape
    assert len(batch["tasks"]) == size and set(batch["tasks"]) == {"qa", "domain", "ner", "extractive_qa"}
    rows = {name: batch["tasks"].count(name) for name in batch["labels"]}
    assert batch["labels"]["qa"].shape == (rows["qa"], length)
    assert batch["labels"]["domain"].shape == (rows["domain"],)
    assert batch["labels"]["ner"].shape == (rows["ner"], length)
    assert batch["labels"]["extractive_qa"].shape == (rows["extractive_qa"], 2)
    collate = SpanQACollator(tokenizer)
    record = next(r for r in records if r["task"] == "extractive_qa")
    encoded = collate.encode(record)
    start, end = encoded["label"]
    text = record["context"][encoded["offsets"][start][0] : encoded["offsets"][end][1]]
    assert text.strip() == record["answers"]["text"][0]


INTERLEAVED = [["shared", "a"], ["shared", "b"], ["a"], ["shared", "a"]]
BLOCKS = [["shared", "a"], ["shared", "a"], ["shared", "b"], ["a"]]  # one block per chain, as the sampler orders them


@pytest.mark.parametrize("method, options, b_rank, chains", [
    ("lora", {"r": 4, "target_modules": "all-linear"}, None, INTERLEAVED),  # one rank: the gathered, batched path
    ("lora", {"r": 4, "target_modules": "all-linear"}, 2, INTERLEAVED),  # two ranks: per chain on its rows
    ("lora", {"r": 4, "target_modules": "all-linear"}, None, BLOCKS),  # contiguous, one rank: still gathered
    ("lora", {"r": 4, "target_modules": "all-linear"}, 2, BLOCKS),  # contiguous, two ranks: split / cat
    ("bottleneck", {}, None, INTERLEAVED)])
def test_per_row_routing_equals_each_row_alone(method, options, b_rank, chains):
    model = testing.tiny_llama(0)
    tuners.apply(model, method, adapter_name="shared", **options)
    for name in ("a", "b"):
        config = tuners.adapters(model)["shared"]
        tuners.add_adapter(model, config.model_copy(update={"r": b_rank}) if name == "b" and b_rank else config, name)
    with torch.no_grad():  # adapters start as no-ops; make each one different
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    ids = torch.randint(0, 64, (4, 6))
    model.train()  # routing must hold in training, with gradients
    from tunelab.multitask import routing

    with row_adapters(model, chains), mock.patch.object(routing, "_lora_split", wraps=routing._lora_split) as split:
        routed = model(input_ids=ids).logits  # (4, 6, V)
    assert split.called == (method == "lora" and chains is BLOCKS and b_rank is not None)  # one rank: gathered
    routed.pow(2).sum().backward()
    routed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for row, chain in enumerate(chains):
        tuners.set_active(model, chain)
        alone = model(input_ids=ids[row : row + 1]).logits
        torch.testing.assert_close(routed[row], alone[0], atol=1e-6, rtol=1e-5)
        alone.pow(2).sum().backward()
    for name, grad in routed_grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sharing", ["hard", "per_task", "hierarchical"])
def test_mixed_batch_in_task_blocks_equals_one_routed_forward(backbone, records, sharing):
    """``mixed_forward: blocks`` (a forward per task block, each cut to its own longest row) gives the
    routed forward's per-task losses, combined loss and gradients; rows scattered over tasks fall back."""
    from tunelab.multitask.collate import block_batch, task_blocks

    base, tokenizer = backbone
    model = copy.deepcopy(base)
    tuners.apply(model, "lora", r=4, target_modules="all-linear")
    losses, grads = {}, {}
    # records grouped by task, as the sampler orders a mixed batch: qa rows are long, domain rows short
    batch_records = [r for task in ("qa", "domain_classification", "ner", "extractive_qa")
                     for r in records if r["task"] == task][::4]
    for mode in ("routed", "blocks"):
        objective = MultitaskObjective(tasks=TASKS, sharing=sharing, switching="example", mixed_forward=mode)
        objective.collator(tokenizer, None, max_length=96, template="plain")
        torch.manual_seed(0)
        objective.setup(model, mock.Mock(device=torch.device("cpu")))
        if mode == "routed":
            with torch.no_grad():  # adapters start as no-ops; make each one different
                for parameter in model.parameters():
                    if parameter.requires_grad:
                        parameter.add_(0.1 * torch.randn_like(parameter))
            heads_state = copy.deepcopy(objective.heads.state_dict())
        objective.heads.load_state_dict(heads_state)
        model.zero_grad()
        objective.heads.zero_grad()
        batch = objective.collate_fn(batch_records)
        with mock.patch.object(MultitaskObjective, "_forward_blocks", autospec=True,
                               side_effect=MultitaskObjective._forward_blocks) as blocked:
            out = objective.loss(model, batch)
        assert blocked.called == (mode == "blocks")
        out.loss.backward()
        losses[mode] = {k: v for k, v in out.metrics.items() if k.startswith("loss/")} | {"loss": float(out.loss.detach())}
        grads[mode] = {n: p.grad.clone() for n, p in [*model.named_parameters(), *objective.heads.named_parameters()]
                       if p.grad is not None}
    assert losses["blocks"] == pytest.approx(losses["routed"], rel=1e-5, abs=1e-6)
    assert grads["blocks"].keys() == grads["routed"].keys() and grads["routed"]
    for name, grad in grads["routed"].items():
        torch.testing.assert_close(grads["blocks"][name], grad, atol=1e-5, rtol=1e-4)

    blocks = task_blocks(batch["tasks"])
    assert [b[0] for b in blocks] == ["qa", "domain", "ner", "extractive_qa"]
    short = block_batch(batch, *blocks[1])  # the domain rows: shorter than the qa rows they were padded to
    assert short["input_ids"].shape[1] < batch["input_ids"].shape[1]
    assert short["attention_mask"][:, -1].any() and short["labels"].keys() == {"domain"}
    assert task_blocks(["a", "b", "a"]) is None  # scattered: the routed forward runs

    # auto: blocks when they drop >= 15% of the B x T positions (here: short rows padded to the qa rows),
    # the routed forward when there is no padding to drop
    auto = MultitaskObjective(tasks=TASKS, sharing=sharing, switching="example")
    auto.collator(tokenizer, None, max_length=96, template="plain")
    auto.setup(model, mock.Mock(device=torch.device("cpu")))
    unpadded = {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}
    for case, expected in ((batch, True), (unpadded, False)):
        with mock.patch.object(MultitaskObjective, "_forward_blocks", autospec=True,
                               side_effect=MultitaskObjective._forward_blocks) as blocked:
            auto.loss(model, case)
        assert blocked.called == expected


def test_prompt_tuning_per_task_trains_on_mixed_batches_through_blocks(backbone, records):
    """Per-row routing refuses prompt methods (they change the sequence); blocks run each task's own
    prompt, so each task's loss in a mixed batch is its loss on its rows alone (equal weighting: their mean)."""
    base, tokenizer = backbone
    model = copy.deepcopy(base)
    tuners.apply(model, "prompt_tuning", num_virtual_tokens=4)
    tasks = TASKS[:2]
    objective = MultitaskObjective(tasks=tasks, sharing="per_task", switching="example")
    objective.collator(tokenizer, None, max_length=96, template="plain")
    objective.setup(model, mock.Mock(device=torch.device("cpu")))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    qa = [r for r in records if r["task"] == "qa"][:3]
    domain = [r for r in records if r["task"] == "domain_classification"][:2]
    model.eval()  # no dropout: the two computations must agree
    mixed = objective.loss(model, objective.collate_fn(qa + domain))
    mixed.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    alone = {name: objective.loss(model, objective.collate_fn(rows)).loss.detach()
             for name, rows in (("qa", qa), ("domain", domain))}
    assert mixed.metrics["loss/qa"] == pytest.approx(float(alone["qa"]), rel=1e-5)
    assert mixed.metrics["loss/domain"] == pytest.approx(float(alone["domain"]), rel=1e-5)
    torch.testing.assert_close(mixed.loss.detach(), (alone["qa"] + alone["domain"]) / 2)
    objective_routed = MultitaskObjective(tasks=tasks, sharing="per_task", switching="example", mixed_forward="routed")
    objective_routed.collator(tokenizer, None, max_length=96, template="plain")
    with pytest.raises(MethodError, match="switching: batch"):
        objective_routed.loss(model, objective_routed.collate_fn(qa + domain))


def test_sampler_resumes_exactly(records):
    objective = MultitaskObjective(tasks=TASKS, sampling="annealed", switching="example")
    config = type("C", (), {"batch_size": 4, "seed": 3, "max_steps": 20, "grad_accum": 1})()
    sampler = objective.sampler(records, config)
    for _ in range(5):
        sampler.next_indices()
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.next_indices() for _ in range(5)]
    resumed = objective.sampler(records, config)
    resumed.load_state_dict(state)
    assert [resumed.next_indices() for _ in range(5)] == expected
    for indices in expected:  # a mixed batch comes ordered by task: one contiguous block per task
        tasks = [records[i]["task"] for i in indices]
        blocks = [task for k, task in enumerate(tasks) if k == 0 or tasks[k - 1] != task]
        assert len(blocks) == len(set(tasks))
    one_task = MultitaskObjective(tasks=TASKS).sampler(records, config)  # per-batch switching
    for _ in range(4):
        assert len({records[i]["task"] for i in one_task.next_indices()}) == 1


def _outputs(model, objective, records):
    batch = objective.collate_fn(records)
    with torch.no_grad():
        return objective.forward(model, batch).per_row()


def test_heads_saved_beside_the_adapters_reload_onto_a_fresh_model_with_equal_outputs(backbone, records, tmp_path):
    base, tokenizer = backbone
    model = copy.deepcopy(base)
    tuners.apply(model, "lora", r=4, target_modules="all-linear")
    objective = MultitaskObjective(tasks=TASKS, sharing="per_task", switching="example")
    train(model, records, objective, {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-2}, tokenizer=tokenizer,
          progress=False)
    model.eval()
    before = _outputs(model, objective, records)
    tuners.save(model, tmp_path)
    assert objective.save_outputs(model, tmp_path) == {"heads": tmp_path / "heads"}
    kinds = json.loads((tmp_path / "heads" / "heads.json").read_text())["heads"]
    assert {name: spec["kind"] for name, spec in kinds.items()} == {
        "qa": "lm", "domain": "classification", "ner": "token_classification", "extractive_qa": "span_qa"}
    assert kinds["domain"]["label_names"] == list(synthetic.label_names("domain_classification"))

    fresh = copy.deepcopy(base)
    tuners.load(fresh, tmp_path)
    heads = load_heads(fresh, tmp_path)
    assert attached_heads(fresh) is heads and heads.trained_tasks == {"qa", "domain", "ner", "extractive_qa"}
    reloaded = MultitaskObjective(saved_options(tmp_path))
    reloaded.collator(tokenizer, None)
    after = _outputs(fresh.eval(), reloaded, records)
    assert len(after) == len(records) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    for task in ("domain", "ner"):  # per task, the head alone: inference by task name
        rows = [r for r, name in zip(records, reloaded.collate_fn(records)["tasks"], strict=True) if name == task]
        batch = reloaded.collate_fn(rows)
        with torch.no_grad():
            reloaded.activate(fresh, task)
            objective.activate(model, task)
            assert torch.equal(heads(fresh, batch, task=task).logits,
                               attached_heads(model)(model, batch, task=task).logits)
    with pytest.raises(ModelError, match="no multi-task heads"):
        load_heads(copy.deepcopy(base), tmp_path / "nowhere")


def test_a_multitask_run_saves_its_heads_and_the_reloaded_model_scores_the_same(tmp_path, small_model_dir):
    from tunelab.experiments.data import build_splits
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import load_spec
    from tunelab.models import zoo

    tasks = "[{name: qa}, {name: domain, match: {task: domain_classification}}]"
    config = tmp_path / "mt.yaml"
    config.write_text(
        f"name: mt\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: '{small_model_dir}'}}\n"
        "method: {name: lora, options: {r: 4, target_modules: all-linear}}\n"
        f"objective: {{name: multitask, options: {{tasks: {tasks}, sharing: per_task}}}}\n"
        "data: {tasks: [qa, domain_classification], domain: medical, train_size: 8, eval_size: 0, test_size: 4, "
        "max_length: 64}\n"
        "train: {max_steps: 2, batch_size: 4, eval_every: null, save_every: null}\n"
        "eval: {max_new_tokens: 4, latency_batches: 0}\n")
    spec = load_spec(config)
    [record] = run_experiment(spec, progress=False, isolate=False)
    adapter_dir = tmp_path / "runs" / "mt" / record["outputs"]["adapter"]
    assert record["outputs"]["heads"] == f"{record['outputs']['adapter']}/heads"
    model, tokenizer = zoo.load(str(small_model_dir), task="causal_lm", progress=False)
    tuners.load(model, adapter_dir)
    load_heads(model, adapter_dir)
    objective = registry.build_objective("multitask", saved_options(adapter_dir).model_dump())
    objective.collator(tokenizer, None, max_length=64, template="plain")
    test = build_splits(spec.data)[2]
    scores = objective.evaluate(model, test, max_new_tokens=4, batch_size=spec.eval.batch_size, progress=False)
    assert {k: v for k, v in scores.items() if "/" in k} == {k: v for k, v in record["metrics"].items() if "/" in k}


@pytest.mark.parametrize("switching", ["batch", "example"])
def test_per_task_training_then_adding_a_task_leaves_old_tasks_bitwise_unchanged(backbone, records, switching):
    base, tokenizer = backbone
    model = copy.deepcopy(base)
    tuners.apply(model, "lora", r=4, target_modules="all-linear")
    objective = MultitaskObjective(tasks=TASKS[:3], sharing="per_task", switching=switching, weighting="uncertainty")
    old = [r for r in records if r["task"] in ("qa", "domain_classification", "ner")]
    config = {"max_steps": 3, "batch_size": 6, "learning_rate": 1e-2, "log_every": 1}
    result = train(model, old, objective, config, tokenizer=tokenizer, progress=False)
    assert sorted(tuners.adapters(model)) == ["domain", "ner", "qa"]
    assert any(key.startswith("loss/") for key in result.history[0])
    model.eval()
    before = _outputs(model, objective, old[:12])
    heads_before = {k: v.clone() for k, v in attached_heads(model).state_dict().items()}

    options = add_task(model, objective.config, TASKS[3])
    assert options.train_tasks == ["extractive_qa"]
    second = MultitaskObjective(options)
    train(model, records, second, config, tokenizer=tokenizer, progress=False)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".extractive_qa." in n for n in trained)
    after = _outputs(model, second, old[:12])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    heads_after = attached_heads(model).state_dict()
    assert all(torch.equal(v, heads_after[k]) for k, v in heads_before.items())
    new = sum(p.numel() for n, p in model.named_parameters() if ".extractive_qa." in n)
    scores = second.evaluate(model, records, max_new_tokens=4, batch_size=16, progress=False)
    assert {"qa/score", "domain/score", "ner/score", "extractive_qa/score", "score"} <= set(scores)
    assert scores["extractive_qa/own_parameters"] >= new
    assert 0.0 <= scores["extractive_qa/answered"] <= 1.0
    assert "answered" not in task_metrics(scores)["extractive_qa"]  # a diagnostic, not a quality metric of Δp


def test_hierarchical_stacks_shared_group_and_task_adapters(backbone, records):
    base, tokenizer = backbone
    model = copy.deepcopy(base)
    tuners.apply(model, "bottleneck")
    objective = MultitaskObjective(tasks=TASKS, sharing="hierarchical", switching="example", weighting="pcgrad")
    train(model, records, objective, {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-2},
          tokenizer=tokenizer, progress=False)
    assert {"default", "group_gen", "group_und", "qa", "ner"} <= set(tuners.adapters(model))
    assert objective.chain(model, "ner") == ["default", "group_und", "ner"]
    assert objective.shared and all(p.requires_grad for p in objective.shared)


def test_delta_p_and_transfer_matrix_by_hand():
    multi = {"a": {"acc": 0.6, "loss": 0.9}, "b": {"f1": 0.4}}
    single = {"a": {"acc": 0.5, "loss": 1.0}, "b": {"f1": 0.5}}
    # a: (+20% acc, +10% lower loss) / 2 = +15%; b: -20%; mean -2.5%
    assert delta_p(multi, single) == pytest.approx(-2.5)
    matrix = transfer_matrix(["a", "b"], {"a": 0.5, "b": 0.4}, {("a", "b"): 0.55, ("b", "a"): 0.3})
    assert matrix[0][0] is None and matrix[0][1] == pytest.approx(10.0) and matrix[1][0] == pytest.approx(-25.0)


def test_tunelab_run_two_tasks_with_single_task_baselines(tmp_path, small_model_dir):
    from tunelab.cli import main

    tasks = "[{name: qa}, {name: domain, match: {task: domain_classification}}]"
    config = tmp_path / "mt.yaml"
    config.write_text(
        f"name: mt\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: '{small_model_dir}'}}\n"
        "method: {name: lora, options: {r: 4, target_modules: all-linear}}\n"
        f"objective: {{name: multitask, options: {{tasks: {tasks}, sharing: per_task, switching: example}}}}\n"
        "data: {tasks: [qa, domain_classification], domain: medical, train_size: 16, eval_size: 0, test_size: 4}\n"
        "train: {max_steps: 2, batch_size: 4, eval_every: null, save_every: null}\n"
        "eval: {max_new_tokens: 4, latency_batches: 1}\n"
        "grid: {params: {objective.options.train_tasks: [null, [qa], [domain]]}}\n")
    assert main(["run", str(config), "--in-process"]) == 0
    results = sorted((tmp_path / "runs" / "mt" / "results").glob("*.json"))
    assert len(results) == 3
    metrics = [json.loads(path.read_text())["metrics"] for path in results]
    assert any({"qa/score", "domain/score"} <= set(m) for m in metrics)
    report = (tmp_path / "runs" / "mt" / "report.md").read_text()
    assert "Multi-task vs single-task" in report and "Δp" in report
    page = (tmp_path / "runs" / "mt" / "report.html").read_text()  # the HTML report has the section too
    assert "Multi-task vs single-task</h2>" in page and "Δp" in page and "<table>" in page


def test_conll_squad_and_task_manifest_formats(tmp_path):
    from tunelab.data import formats

    (tmp_path / "ner.txt").write_text("-DOCSTART- O\n\nEU B-ORG\nrejects O\nGerman B-MISC\n\nPeter B-PER\nBlackburn I-PER\n")
    squad = {"data": [{"paragraphs": [{"context": "Normandy is in France.", "qas": [
        {"id": "q1", "question": "Where?", "answers": [{"text": "France", "answer_start": 15}]},
        {"id": "q2", "question": "Who?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "tasks.yaml").write_text("tasks:\n  - {task: ner, source: ner.txt, format: conll}\n"
                                         "  - {task: qa, source: squad.json, format: squad, limit: 1}\n")
    ner = formats.load_records(tmp_path / "ner.txt", format="conll")
    assert [r["tokens"] for r in ner] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert ner[1]["ner_tags"] == ["B-PER", "I-PER"] and ner[1]["response"] == "Peter Blackburn [PER]"
    qa = formats.load_records(tmp_path / "squad.json", format="squad")
    assert qa[0]["answers"] == {"text": ["France"], "answer_start": [15]} and qa[1]["answers"]["text"] == []
    mixed = formats.load_records(tmp_path / "tasks.yaml")
    assert [r["task"] for r in mixed] == ["ner", "ner", "qa"]


def test_a_run_resumed_after_its_first_stage_gets_that_stages_heads_back(tmp_path, small_model_dir):
    """Stage 2 adds a task; a cell killed in stage 2 restores stage 1's heads (they are not model parameters)."""
    from tunelab.experiments.grid import expand_grid
    from tunelab.experiments.runner import run_cell
    from tunelab.experiments.spec import validate

    old = [{"name": "qa"}, {"name": "domain", "match": {"task": "domain_classification"}}]
    raw = {
        "name": "mt", "output_dir": str(tmp_path), "model": {"name": str(small_model_dir)},
        "method": {"name": "lora", "options": {"r": 2, "target_modules": "all-linear"}},
        "objective": {"name": "multitask", "options": {"tasks": old, "sharing": "per_task"}},
        "data": {"tasks": ["qa", "domain_classification", "ner"], "domain": "medical", "train_size": 8,
                 "eval_size": 0, "test_size": 2, "max_length": 48},
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 3e-2, "save_every": None, "log_every": 1},
        "eval": {"max_new_tokens": 2, "latency_batches": 0},
        "stages": [{"name": "first"},
                   {"name": "added", "objective": {"name": "multitask", "options": {
                       "tasks": [*old, {"name": "ner"}], "sharing": "per_task", "train_tasks": ["ner"]}}}],
    }
    cell = expand_grid(validate(raw))[0]
    straight = run_cell(cell, tmp_path / "straight", progress=False)
    run_cell(cell, tmp_path / "partial", progress=False)
    for path in (tmp_path / "partial" / ".work" / cell.run_id).glob("*-1*"):  # as if killed in stage 2
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run_cell(cell, tmp_path / "partial", progress=False)
    assert resumed["stage_matrix"]["metrics"] == straight["stage_matrix"]["metrics"]
    assert [e.get("loss") for e in resumed["history"]] == [e.get("loss") for e in straight["history"]]
    saved = json.loads((tmp_path / "partial" / "adapters" / cell.run_id / "heads" / "heads.json").read_text())
    assert sorted(saved["heads"]) == ["domain", "ner", "qa"]


def _fake_result(trained, seed, size, scores):
    tasks = [{"name": name} for name in ("qa", "ner")]
    options = {"tasks": tasks, "train_tasks": trained if len(trained) == 1 else None}
    run_id = f"lora-n{size}-s{seed}-train_tasks{trained[0] if len(trained) == 1 else 'None'}"
    return {"run_id": run_id, "seed": seed, "train_size": 2 * size,
            "data_sizes": {"train_requested": size},
            "config": {"objective": {"name": "multitask", "options": options}},
            "metrics": {f"{t}/score": scores[t] for t in trained}}


def test_report_section_has_data_efficiency_curves_and_a_transfer_heatmap():
    """Single vs multi at two sizes and two seeds: the efficiency table holds each mean ± CI, the section links
    both figures, and the figures are real PNGs."""
    from tunelab.experiments.plots import ci95
    from tunelab.multitask import report

    results = []
    for seed, noise in ((0, 0.0), (1, 0.02)):
        for size, base in ((10, 0.2), (100, 0.6)):
            results += [_fake_result(["qa"], seed, size, {"qa": base + noise}),
                        _fake_result(["ner"], seed, size, {"ner": base + 0.1 + noise}),
                        _fake_result(["qa", "ner"], seed, size, {"qa": base + 0.05 + noise, "ner": base + noise})]
    curves = report.efficiency(results)
    assert curves["qa"]["single-task"] == {10: [0.2, 0.22], 100: [0.6, 0.62]}
    assert curves["qa"]["lora-train_tasksNone"][10] == pytest.approx([0.25, 0.27])
    section = report.markdown_section(results)
    assert "### Data efficiency" in section and "![data efficiency](plots/multitask_efficiency.png)" in section
    assert f"| single-task | 0.210 ± {ci95([0.2, 0.22]):.3f} | 0.610 ± {ci95([0.6, 0.62]):.3f} |" in section
    assert "![transfer matrix](plots/multitask_transfer.png)" in section
    pngs = report.plots(results)
    assert set(pngs) == {"multitask_efficiency", "multitask_transfer"}
    assert all(png.startswith(b"\x89PNG") and len(png) > 5000 for png in pngs.values())
    one_size = [r for r in results if r["data_sizes"]["train_requested"] == 100]
    assert "Data efficiency" not in report.markdown_section(one_size)  # a curve needs two sizes
    assert set(report.plots(one_size)) == {"multitask_transfer"}
