"""The SmolLM2 medical study's pieces: the PubMedQA reader, ``choice`` scoring, and the shipped configs
running on a user's own files (tiny random model, so fast)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from tunelab.data import formats
from tunelab.errors import DataError
from tunelab.eval import tasks

CONFIGS = Path(str(resources.files("tunelab") / "configs"))


def _pubmedqa_fixture(path: Path, n: int = 12) -> Path:
    decisions = ["yes", "no", "maybe"]
    rows = {str(9000 + i): {"QUESTION": f"Does drug {i} lower  blood pressure?",
                            "CONTEXTS": [f"Drug {i} was given to {10 + i} patients.", "Blood pressure fell in most."],
                            "LABELS": ["BACKGROUND", "RESULTS"], "MESHES": [], "LONG_ANSWER": "It did.",
                            "final_decision": decisions[i % 3]} for i in range(n)}
    path.write_text(json.dumps(rows, indent=4))  # pretty-printed, like the real file
    return path


# -------------------------------------------------------------------------------------- the reader
def test_pubmedqa_reader_on_a_fixture(tmp_path):
    path = _pubmedqa_fixture(tmp_path / "mine.json")
    assert formats.is_pubmedqa(path)
    records = formats.load_records(path)  # detected from the keyed-object shape
    assert len(records) == 12 and [r["id"] for r in records][:2] == ["pubmedqa-9000", "pubmedqa-9001"]
    first = records[0]
    assert first["kind"] == "choice" and first["task"] == "pubmedqa" and first["domain"] == "medical"
    assert first["response"] == first["label"] == "yes" and first["choices"] == ["yes", "no", "maybe"]
    assert first["prompt"] == ("Context: Drug 0 was given to 10 patients. Blood pressure fell in most.\n"
                               "Question: Does drug 0 lower blood pressure?\nAnswer yes, no or maybe.")
    assert formats.load_records(path, format="pubmedqa", limit=5) == records[:5]
    short = formats.pubmedqa_records(path, max_context_words=3)[0]["prompt"]
    assert short.startswith("Context: Drug 0 was ...\nQuestion:")  # the question always survives


def test_pubmedqa_reader_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"QUESTION": "q?", "CONTEXTS": ["c"], "final_decision": "perhaps"}}))
    with pytest.raises(DataError, match=r"entry '1': final_decision must be one of yes, no, maybe"):
        formats.load_records(bad)
    bad.write_text(json.dumps({"1": {"QUESTION": "q?", "CONTEXTS": ["c"]}}))
    with pytest.raises(DataError, match="missing key 'final_decision'"):
        formats.load_records(bad, format="pubmedqa")
    with pytest.raises(DataError, match="columns= applies"):
        formats.load_records(_pubmedqa_fixture(tmp_path / "ok.json"), format="pubmedqa", columns={"prompt": "q"})
    with pytest.raises(DataError, match="PubMedQA file not found"):
        formats.pubmedqa_records(tmp_path / "absent.json")


def test_other_json_files_are_not_taken_for_pubmedqa(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    assert not formats.is_pubmedqa(alpaca) and formats.load_records(alpaca)[0]["kind"] == "generation"
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"a": {"question": "q", "answer": "a"}}))
    assert not formats.is_pubmedqa(keyed)


def test_pubmedqa_reader_on_the_real_file(shared_dir):
    from tunelab.adapt.real import pubmedqa_records

    path = shared_dir / "data" / "domain" / "medical" / "pubmedqa_ori_pqal.json"
    records = formats.load_records(path)
    assert len(records) == 1000 and {r["kind"] for r in records} == {"choice"}
    counts = {c: sum(r["label"] == c for r in records) for c in ("yes", "no", "maybe")}
    assert counts == {"yes": 552, "no": 338, "maybe": 110}  # the published PQA-L label distribution
    assert all(r["prompt"].endswith("\nAnswer yes, no or maybe.") and "\nQuestion: " in r["prompt"] for r in records)
    assert pubmedqa_records(path) == records  # adapt.real's converter is this reader


# -------------------------------------------------------------------------------------- scoring
def test_choice_accuracy_reads_the_first_word_of_the_answer():
    records = [{"task": "pubmedqa", "kind": "choice", "label": label, "choices": ["yes", "no", "maybe"]}
               for label in ("yes", "no", "maybe", "yes", "no")]
    generations = ["Yes, the study shows a benefit.", "no.", "Maybe", "The answer is yes", "  NO!"]
    scores = tasks.score_generations(records, generations)
    assert scores["accuracy"] == pytest.approx(4 / 5) and scores["score"] == scores["accuracy"]
    assert tasks.main_metric("pubmedqa", "choice") == "accuracy" and 0 < scores["macro_f1"] < 1
    assert tasks.chosen_option("Sci/Tech news today", ["World", "Sci/Tech"]) == "scitech"
    assert tasks.chosen_option("Business as usual", ["Business", "Business news"]) == "business"
    assert tasks.chosen_option("Business news: up", ["Business", "Business news"]) == "business news"
    assert tasks.chosen_option("", ["yes"]) == ""


def test_majority_baseline_covers_choice_records():
    from tunelab.experiments.baselines import majority_class

    train = [{"kind": "choice", "label": label} for label in ("yes", "yes", "no")]
    test = [{"kind": "choice", "label": label} for label in ("yes", "no", "maybe", "yes")]
    baseline = majority_class(train, test, label_key=None)
    assert baseline["label"] == "yes" and baseline["accuracy"] == 0.5
    assert majority_class([{"kind": "generation", "response": "x"}], test, label_key=None) is None


def test_baselines_table_shows_a_choice_tasks_macro_f1():
    from tunelab.experiments.report_baselines import markdown_section

    result = {"run_id": "lora-n8-s0", "metrics": {"score": 0.5, "pubmedqa/macro_f1": 0.25},
              "baselines": {"untuned": {"score": 0.25}, "majority_class": None}, "data_sizes": {}}
    assert "| lora-n8-s0 | ? / ? / ? | 0.5000 | 0.2500 | 0.2500 |" in markdown_section([result])


# ------------------------------------------------------------------- the shipped configs, own files
@pytest.mark.parametrize("config", ["smollm2_medical", "smollm2_medical_pubmedqa"])
def test_study_configs_run_on_a_users_own_files(config, small_model_dir, tmp_path):
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import load_spec

    if config == "smollm2_medical":  # a question/answer file with its own column names
        source = tmp_path / "my_qa.jsonl"
        source.write_text("".join(json.dumps({"q": f"What treats condition {i}?", "a": f"Drug {i} treats it."}) + "\n"
                                  for i in range(12)))
        data = [f"data.source={source}", "data.columns={prompt: q, response: a}"]
    else:  # a file in PubMedQA's shape
        data = [f"data.source={_pubmedqa_fixture(tmp_path / 'my_pubmedqa.json')}"]
    overrides = [f"model.name={small_model_dir}", f"output_dir={tmp_path}", "data.train_size=6", "data.test_size=4",
                 "train.max_steps=1", "train.batch_size=2", "eval.max_new_tokens=3", "data.max_length=64",
                 "grid.methods=[{name: lora, options: {r: 2, target_modules: all-linear}}, "
                 "{name: prompt_tuning, options: {num_virtual_tokens: 2}}]", *data]
    spec = load_spec(CONFIGS / f"{config}.yaml", overrides)
    assert spec.data.template == "auto"
    results = run_experiment(spec, progress=False, isolate=False)
    assert [r["method_label"] for r in results] == ["lora", "prompt_tuning"]
    task = "my_qa" if config == "smollm2_medical" else "pubmedqa"
    metric = "rouge_l" if config == "smollm2_medical" else "accuracy"
    for result in results:
        assert result["metrics"][f"{task}/score"] == result["metrics"][f"{task}/{metric}"]
        assert result["baselines"]["untuned"] is not None
    if config == "smollm2_medical_pubmedqa":
        assert results[0]["baselines"]["majority_class"]["label"] in ("yes", "no", "maybe")
    assert (tmp_path / spec.name / "report.md").is_file()
