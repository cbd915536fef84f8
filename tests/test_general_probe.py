"""The general-ability (forgetting) probe, issue 12 item 4 / issue 15 item 3: held-out general-domain
perplexity of the untuned base and of every cell after training (``eval.general_probe``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from process_helpers import cli as _cli

from tunelab.errors import ConfigError, DataError
from tunelab.eval import probe


def _model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _hand_perplexity(model, sequences: list[list[int]]) -> tuple[float, int]:
    """exp(mean NLL) one unpadded document at a time: -log p(x_t | x_<t) summed over t >= 1."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            total -= sum(float(log_probs[t, ids[t + 1]]) for t in range(len(ids) - 1))
            count += len(ids) - 1
    return math.exp(total / count), count


# ------------------------------------------------------------------------------------- measurement
def test_perplexity_is_exp_of_the_hand_computed_mean_nll_with_adapters_active(small_model_dir):
    from tunelab import tuners

    model, tokenizer = _model(small_model_dir)
    texts = ["The river Tesore runs through Saint Norudal.", "Who founded Linmere?\nZeno Hesaani",
             "A much longer document about the general domain, " * 6]
    sequences = probe.encode(tokenizer, texts, max_length=48)
    assert len({len(s) for s in sequences}) == 3 and max(map(len, sequences)) == 48  # padding and a cut
    assert all(s[0] == tokenizer.bos_token_id for s in sequences)
    measured = probe.measure(model, tokenizer, sequences, batch_size=2)  # pad is not scored
    expected, tokens = _hand_perplexity(model, sequences)
    assert measured["tokens"] == tokens == sum(len(s) - 1 for s in sequences)
    assert measured["perplexity"] == pytest.approx(expected, rel=1e-5)

    tuners.apply(model, "lora", r=2, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    adapted = probe.measure(model, tokenizer, sequences, batch_size=3)["perplexity"]
    assert adapted == pytest.approx(_hand_perplexity(model, sequences)[0], rel=1e-5)
    assert adapted != pytest.approx(expected, rel=1e-3)  # the adapter is active
    with tuners.disabled(model):
        assert probe.measure(model, tokenizer, sequences)["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert probe.change(adapted, expected) == pytest.approx(adapted / expected - 1)


def test_synthetic_probe_text_is_disjoint_from_the_training_data_of_its_world():
    from tunelab.data import synthetic
    from tunelab.experiments.data import CORPUS_TASK, _corpus_records
    from tunelab.experiments.spec import DataSpec

    documents = probe.load_texts("synthetic", 64, seed=0)
    assert len(documents) == 64 and documents == probe.load_texts("synthetic", 64, seed=0)  # deterministic
    world = synthetic.default_world(0)
    words = set(re.findall(r"\w+", "\n".join(documents)))

    def mentioned(entity) -> bool:
        return all(part in words for part in entity.name.split())

    for domain in synthetic.DOMAINS:  # no training entity of any domain is in the probe
        assert not [e.name for e in world.split_entities(domain, "train") if mentioned(e)]
    assert any(mentioned(e) for e in world.split_entities("general", "test"))  # it is about held-out ones
    # nor is any training text: every task's records (closed-book qa's too), the DAPT corpus task,
    # tiny-llama's pretraining corpus
    training = {synthetic.render_example(r) for task in synthetic.TASKS if task != "preference"
                for r in synthetic.make_task(task, domain="general", split="train", n=300, seed=0)}
    data = DataSpec(tasks=[CORPUS_TASK], domain="general", seed=0)
    training |= {r["text"] for r in _corpus_records(data, "train", 200)}
    training |= set(synthetic.corpus(domains=("general",), n_documents=200, seed=0, split="train"))
    assert not any(doc in training or any(piece in training for piece in doc.split("\n\n")) for doc in documents)


def test_file_sources_and_their_one_line_errors(tmp_path):
    jsonl = tmp_path / "general.jsonl"
    jsonl.write_text('{"text": "first document"}\n\n{"text": "second", "id": 2}\n{"text": "third"}\n')
    assert probe.load_texts(str(jsonl), 2) == ["first document", "second"]
    plain = tmp_path / "general.txt"
    plain.write_text("one\nstill one\n\n\ntwo\n")
    assert probe.load_texts(str(plain), 10) == ["one\nstill one", "two"]

    def error(path: Path) -> str:
        with pytest.raises(DataError) as caught:
            probe.load_texts(str(path), 8)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert error(tmp_path / "absent.jsonl").startswith("general probe file not found")
    (tmp_path / "empty.txt").write_text("\n \n")
    assert "holds no text" in error(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"prompt": "no text"}\n')
    assert "line 2" in error(tmp_path / "bad.jsonl") and "'text'" in error(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    assert "not JSON" in error(tmp_path / "broken.jsonl")


def test_encoders_are_skipped_with_a_reason():
    assert probe.skip_reason("causal_lm") is None
    assert "not a causal language model" in probe.skip_reason("sequence_classification")


# ------------------------------------------------------------------------------------- config
def test_the_option_is_off_by_default_and_leaves_existing_cell_keys_alone(tmp_path):
    from tunelab.experiments import baselines
    from tunelab.experiments.grid import cell_key, expand_grid
    from tunelab.experiments.spec import resolve_stages, validate

    raw = {"name": "x", "data": {"train_size": 16}, "eval": {"max_new_tokens": 4},
           "stages": [{"name": "a"}, {"name": "b", "data": {"domain": "legal"}}]}
    cell = expand_grid(validate(raw))[0]
    assert cell.spec.eval.general_probe is None
    # Pinned from the code before eval.general_probe existed: a default-off option must not make every
    # finished study stale. (If a change is meant to rerun every study, update these and say so.)
    assert cell_key(cell) == "5075f1bb1af2bd31"
    assert baselines.untuned_key(cell.spec, resolve_stages(cell.spec)) == "3fa480349417c609"

    def probed(value):
        spec = validate({**raw, "eval": {"max_new_tokens": 4, "general_probe": value}})
        return spec.eval.general_probe, expand_grid(spec)[0]

    assert probed(False)[0] is None and cell_key(probed(False)[1]) == "5075f1bb1af2bd31"
    on = probed(True)
    assert on[0] == probed({})[0] == probed("synthetic")[0] and on[0].source == "synthetic"
    assert cell_key(on[1]) != "5075f1bb1af2bd31"  # turning it on runs the cells again
    assert baselines.untuned_key(on[1].spec, resolve_stages(on[1].spec)) == "3fa480349417c609"
    probe_file = tmp_path / "g.txt"
    probe_file.write_text("one document\n")
    _, first = probed(str(probe_file))
    before = cell_key(first)
    probe_file.write_text("another document\n")
    assert cell_key(first) != before  # the probe file's content is part of the key
    with pytest.raises(ConfigError, match=r"eval\.general_probe\.documents"):
        validate({"name": "x", "eval": {"general_probe": {"documents": 0}}})
    with pytest.raises(ConfigError, match=r"eval\.general_probe\.text_field': unknown key"):
        validate({"name": "x", "eval": {"general_probe": {"text_field": "body"}}})


# ------------------------------------------------------------------------------------- runner + report
CONFIG = ("name: exp\noutput_dir: {runs}\nmodel: {{name: '{model}'}}\n"
          "data: {{tasks: [summarization], domain: medical, train_size: 8, eval_size: 0, test_size: 1}}\n"
          "train: {{max_steps: 2, batch_size: 4, save_every: null, log_every: 1, learning_rate: 0.05}}\n"
          "method: {{name: lora, options: {{r: 2, target_modules: [q_proj, v_proj]}}}}\n"
          "eval: {{max_new_tokens: 1, latency_batches: 0, general_probe: {probe}}}\n"
          "stages: [{{name: first}}, {{name: second, data: {{domain: legal}}}}]\n")


def test_a_run_records_general_perplexity_before_and_after_and_reports_it(tmp_path, small_model_dir, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(CONFIG.format(runs=tmp_path / "runs", model=small_model_dir,
                                    probe="{documents: 4, max_length: 32}"))
    code, _, err = _cli(capsys, "run", str(config), "--in-process")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "exp"
    result = json.loads((run_dir / "results" / "lora-n8-s0.json").read_text())
    general = result["general_probe"]
    assert general["source"] == "synthetic" and general["documents"] == 4 and general["tokens"] > 0
    before, after = general["ppl_before"], general["ppl_after"]
    assert before > 1 and after > 1 and after != before
    assert general["change"] == pytest.approx(after / before - 1)
    assert result["metrics"]["general_ppl"] == after
    assert result["metrics"]["general_ppl_change"] == general["change"]
    assert result["baselines"]["untuned"]["general_ppl"] == before  # the before is the untuned row's
    assert [s["name"] for s in general["stages"]] == ["first", "second"]
    assert general["stages"][-1]["ppl"] == after and result["stages"][0]["general_ppl"] == general["stages"][0]["ppl"]
    # the before is the base model's: measured once, cached beside the task baselines
    model, tokenizer = _model(small_model_dir)
    texts = probe.load_texts("synthetic", 4)
    assert before == pytest.approx(probe.measure(model, tokenizer, probe.encode(tokenizer, texts, 32))["perplexity"])
    cached = json.loads(next((run_dir / "baselines").glob("general-*.json")).read_text())
    assert cached["general_probe"]["perplexity"] == before
    report = (run_dir / "report.md").read_text()
    assert "## Forgetting: general held-out perplexity" in report
    assert f"| lora | 8 | 1 | {before:.3f} | {after:.3f} | {100 * (after / before - 1):+.2f}% |" in report
    assert "| after first | after second |" in report
    assert "<h2>Forgetting: general held-out perplexity</h2>" in (run_dir / "report.html").read_text()


def test_a_missing_probe_file_stops_the_run_before_it_writes(tmp_path, small_model_dir, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(CONFIG.format(runs=tmp_path / "runs", model=small_model_dir,
                                    probe=f"{{source: '{tmp_path / 'absent.jsonl'}'}}"))
    code, _, err = _cli(capsys, "run", str(config), "--in-process")
    assert code == 2 and not (tmp_path / "runs").exists()
    assert err.strip().splitlines() == [f"error: general probe file not found: {tmp_path / 'absent.jsonl'} "
                                        f"({probe.SOURCE_HELP})"]


def test_per_domain_adapters_serve_the_probe_with_the_general_adapter(tmp_path, small_model_dir):
    from tunelab import tuners
    from tunelab.adapt.store import store
    from tunelab.experiments.runner import _GeneralProbe
    from tunelab.experiments.spec import validate

    model, tokenizer = _model(small_model_dir)
    spec = validate({"name": "x", "eval": {"general_probe": {"documents": 2, "max_length": 24}}})
    general = _GeneralProbe(tmp_path, spec, "causal_lm", model, tokenizer)  # before: the bare base
    for name in ("general", "legal"):
        tuners.apply(model, "lora", r=2, target_modules=["q_proj"], adapter_name=name)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    tuners.set_active(model, ["legal"])
    assert general.after(model)["general_probe_adapters"] == ["legal"]  # the model as it is left
    store(model)["domain_adapters"] = {"general": "general", "legal": "legal"}  # what per_domain records
    served = general.after(model)
    assert served["general_probe_adapters"] == ["general"] and tuners.active_adapters(model) == ["legal"]
    tuners.set_active(model, ["general"])
    assert served["general_ppl"] == probe.measure(model, tokenizer, general.sequences, 32)["perplexity"]
    assert served["general_ppl_change"] == pytest.approx(served["general_ppl"] / general.before["perplexity"] - 1)
    # an encoder: skipped with its reason; the option off: nothing at all
    encoder = _GeneralProbe(tmp_path, spec, "sequence_classification", None, None)
    assert encoder.after(None) == {} and "not a causal language model" in encoder.record([{}])["skipped"]
    off = _GeneralProbe(tmp_path, validate({"name": "x"}), "causal_lm", model, tokenizer)
    assert off.after(model) == {} and off.record([{}]) is None


def test_report_section_aggregates_seeds_lists_skips_and_joins_the_continual_table():
    from tunelab.experiments import report_probe, report_stages

    def result(label, seed, before, after, stages=None):
        return {"run_id": f"{label}-s{seed}", "method_label": label, "train_size": 8,
                "general_probe": {"source": "synthetic", "documents": 4, "tokens": 100, "ppl_before": before,
                                  "ppl_after": after, "change": after / before - 1,
                                  "stages": stages or [{"name": "main", "ppl": after, "change": after / before - 1}]}}

    results = [result("naive", 0, 2.0, 3.0), result("naive", 1, 2.0, 2.6), result("replay", 0, 2.0, 2.2),
               {"run_id": "enc-s0", "method_label": "enc", "train_size": 8,
                "general_probe": {"skipped": "the model is a sequence classification model, ..."}}]
    section = report_probe.markdown_section(results)
    assert "| naive | 8 | 2 | 2.000 | 2.800 ± 2.541 | +40.00% ± 127.06% |" in section  # t(1) = 12.706
    assert "| replay | 8 | 1 | 2.000 | 2.200 | +10.00% |" in section
    assert "- enc-s0: probe skipped (the model is a sequence classification model, ...)" in section
    assert report_probe.markdown_section([{"run_id": "x", "method_label": "x", "train_size": 1}]) == ""
    assert report_probe.mean_change_by_label(results) == pytest.approx({"naive": 0.4, "replay": 0.1})
    matrices = {"naive": {"stages": ["a", "b"], "scores": [[0.5, 0.1], [0.3, 0.6]], "seeds": 2}}
    table = report_stages.continual_table(matrices, None, {"naive": 0.4})
    assert "| final in-domain | general ppl Δ |" in table and table.rstrip().endswith("| +40.00% |")
    assert "general ppl Δ" not in report_stages.continual_table(matrices)  # unchanged without the probe
