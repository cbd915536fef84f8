"""Real data formats: record counts and content on ../shared/data samples, fixtures for the rest,
and one-line DataErrors that name the file and the line."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import pytest

from tunelab.data import formats, templates
from tunelab.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"shared data sample {relative} not available")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def data_error(*args, **kwargs) -> str:
    """The message of the DataError that load_records raises; it must be one line."""
    with pytest.raises(DataError) as info:
        formats.load_records(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- real samples


def test_alpaca_demo_records():
    records = formats.load_records(shared("instruction/llamafactory_alpaca_en_demo.json"))
    assert len(records) == 999
    assert {r["kind"] for r in records} == {"generation"}
    assert len({r["id"] for r in records}) == 999
    raw = json.loads(shared("instruction/llamafactory_alpaca_en_demo.json").read_text())
    for record, row in zip(records, raw, strict=True):
        assert record["response"] == row["output"] and record["instruction"] == row["instruction"]
        expected = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        assert record["prompt"] == expected and record["input"] == row["input"]


def test_alpaca_template_reproduces_stanford_text():
    """torchtune's sample stores the Stanford-rendered ``text``: our template must give it back."""
    path = shared("instruction/torchtune_alpaca_tiny.json")
    records = formats.load_records(path, format="alpaca")
    raw = json.loads(path.read_text())
    assert len(records) == 100 and any(row["input"] for row in raw)  # both template variants occur
    for record, row in zip(records, raw, strict=True):
        assert formats.render_prompt(record, "alpaca") + record["response"] == row["text"]


def _leaf_paths(node: dict, above: list) -> list[list[dict]]:
    path = above + [node]
    if not node["replies"]:
        return [path]
    return [leaf for reply in node["replies"] for leaf in _leaf_paths(reply, path)]


def test_oasst_tree_paths_match_the_raw_trees():
    path = shared("instruction/oasst_en_100_tree.jsonl")
    trees = [json.loads(line) for line in path.read_text().splitlines()]
    expected, tree_ids = [], []
    for tree in trees:
        paths = [p for p in _leaf_paths(tree["prompt"], []) if p[-1]["role"] == "assistant"]
        expected += paths
        tree_ids += [tree["message_tree_id"]] * len(paths)
    records = formats.load_records(path)
    assert len(trees) == 100 and len(records) == len(expected) == 400
    assert [r["message_tree_id"] for r in records] == tree_ids and len(set(tree_ids)) == 96  # 4 end in prompters
    assert [r["id"] for r in records] == [p[-1]["message_id"] for p in expected]
    for record, raw_path in zip(records, expected, strict=True):
        assert record["kind"] == "chat"
        assert [m["content"] for m in record["messages"]] == [n["text"] for n in raw_path]
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"] * (len(raw_path) // 2)
        assert record["response"] == raw_path[-1]["text"]
        if len(raw_path) == 2:
            assert record["prompt"] == raw_path[0]["text"]
        else:
            assert record["prompt"].startswith("User: ") and "\n\nAssistant: " in record["prompt"]


def test_oasst_flat_message_table_gives_the_same_paths(tmp_path):
    trees = [json.loads(line) for line in shared("instruction/oasst_en_100_tree.jsonl").read_text().splitlines()]
    rows = []

    def flatten(node: dict, parent: str | None) -> None:
        rows.append({"message_id": node["message_id"], "parent_id": parent, "role": node["role"], "text": node["text"]})
        for reply in node["replies"]:
            flatten(reply, node["message_id"])

    for tree in trees[:10]:
        flatten(tree["prompt"], None)
    flat = formats.load_records(write_jsonl(tmp_path / "oasst1_flat.jsonl", rows))
    nested = [r for r in formats.load_records(shared("instruction/oasst_en_100_tree.jsonl"))
              if r["message_tree_id"] in {t["message_tree_id"] for t in trees[:10]}]
    assert [r["messages"] for r in flat] == [r["messages"] for r in nested] and len(flat) > 10


def test_hh_rlhf_split_keeps_the_transcripts():
    path = shared("preference/hh_rlhf_harmless_base_test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle]
    records = formats.load_records(path)
    assert len(records) == len(raw) == 2312
    for record, row in zip(records, raw, strict=True):
        assert record["kind"] == "preference" and record["prompt"].endswith("\n\nAssistant:")
        assert record["prompt"] + record["chosen"] == row["chosen"]
        assert record["prompt"] + record["rejected"] == row["rejected"]
        assert "\n\nAssistant:" not in record["chosen"] or "\n\nAssistant:" not in record["rejected"]
        assert record["messages"][0]["role"] == "user" and record["messages"][-1]["role"] == "user"
    first = records[0]
    assert first["chosen"].strip().startswith("No, sorry!")
    assert first["messages"][-1]["content"] == "okay some of these do not have anything to do with pens"
    assert len(first["messages"]) == 5


def test_llamafactory_dpo_pairs():
    path = shared("preference/llamafactory_dpo_en_demo.json")
    raw = json.loads(path.read_text())
    records = formats.load_records(path)
    assert len(records) == 300 and {r["kind"] for r in records} == {"preference"}
    for record, row in zip(records, raw, strict=True):
        assert record["chosen"] == row["chosen"]["value"] and record["rejected"] == row["rejected"]["value"]
        assert record["messages"][-1] == {"role": "user", "content": row["conversations"][-1]["value"]}
        has_system = row["conversations"][0]["from"] == "system"
        assert ("system" in record) == has_system
        if len(row["conversations"]) == 1 + has_system:
            assert record["prompt"] == row["conversations"][-1]["value"]


def test_sst2_tsv_with_header_and_limit():
    records = formats.load_records(shared("nlp/sst2_train_60614.tsv"), limit=500)
    assert len(records) == 500 and {r["kind"] for r in records} == {"classification"}
    assert {r["label"] for r in records} == {"0", "1"}
    assert records[0]["text"] == "when are bears bears and " and records[0]["response"] == records[0]["label"]


def test_agnews_headerless_tsv_with_column_indices():
    path = shared("nlp/agnews_test_7600.tsv")
    records = formats.load_records(path, columns={"text": 0, "label": 1})
    assert len(records) == 7600
    assert {r["label"] for r in records} == {"World", "Sports", "Business", "Sci/Tech"}
    assert records[0]["text"].startswith("Unions representing workers at Turner")
    assert '"Music Manifesto"' in "".join(r["text"] for r in records)  # CSV quoting is undone
    by_name = formats.load_records(path, columns={"text": "0", "label": "1"}, limit=5)
    assert [r["text"] for r in by_name] == [r["text"] for r in records[:5]]
    assert "columns=" in data_error(path)  # its first line is data, not a header


# ----------------------------------------------------------------------------- fixtures


def test_dolly_jsonl(tmp_path):
    rows = [
        {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
        {"instruction": "Who wrote it?", "context": "Hamlet is a play.", "response": "Shakespeare.",
         "category": "closed_qa"},
    ]
    records = formats.load_records(write_jsonl(tmp_path / "dolly.jsonl", rows))
    assert [r["prompt"] for r in records] == ["Name a colour.", "Who wrote it?\n\nHamlet is a play."]
    assert [r["category"] for r in records] == ["open_qa", "closed_qa"] and records[1]["response"] == "Shakespeare."
    assert formats.render_prompt(records[1], "alpaca").endswith("### Input:\nHamlet is a play.\n\n### Response:\n")


def test_sharegpt_conversations(tmp_path):
    rows = [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "thanks"},  # trailing user turn: nothing to learn, dropped
    ]}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    (record,) = formats.load_records(path)
    assert record["kind"] == "chat" and record["system"] == "Be brief." and record["response"] == "Paris."
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert record["prompt"] == "User: Hi\n\nAssistant: Hello\n\nUser: Capital of France?"
    rows[0]["conversations"][1]["from"] = "robot"
    path.write_text(json.dumps(rows))
    message = data_error(path)
    assert f"{path} item 0" in message and "'robot'" in message


def test_csv_with_column_mapping_and_gzip(tmp_path):
    text = 'question,answer,source\n"Is 2, 3 prime?",yes,quiz\nWhat is 2+2?,4,quiz\n'
    path = tmp_path / "qa.csv"
    path.write_text(text)
    records = formats.load_records(path, columns={"prompt": "question", "response": "answer"})
    assert [(r["prompt"], r["response"], r["kind"]) for r in records] == [
        ("Is 2, 3 prime?", "yes", "generation"), ("What is 2+2?", "4", "generation")]
    zipped = tmp_path / "qa.csv.gz"
    zipped.write_bytes(gzip.compress(text.encode()))
    again = formats.load_records(zipped, columns={"prompt": "question", "response": "answer"})
    assert [r["prompt"] for r in again] == [r["prompt"] for r in records] and again[0]["task"] == "qa"
    message = data_error(path, columns={"prompt": "question", "response": "reply"})
    assert f"{path} line 2" in message and "'reply'" in message and "question, answer, source" in message


def test_jsonl_generic_kinds(tmp_path):
    rows = [{"text": "great film", "label": 1}, {"text": "dull", "label": 0}]
    records = formats.load_records(write_jsonl(tmp_path / "sentiment.jsonl", rows), format="jsonl")
    assert [(r["kind"], r["label"], r["response"]) for r in records] == [("classification", "1", "1"),
                                                                        ("classification", "0", "0")]
    ner = [{"tokens": ["Ada", "Lovelace", "lives", "in", "Paris"], "ner_tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]}]
    (record,) = formats.load_records(write_jsonl(tmp_path / "ner.jsonl", ner))
    assert record["kind"] == "ner" and record["prompt"] == "Tag the entities: Ada Lovelace lives in Paris"
    assert record["response"] == "Ada Lovelace [PER]; Paris [LOC]"  # as the built-in NER task renders it
    prefs = [{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}]
    (record,) = formats.load_records(write_jsonl(tmp_path / "prefs.jsonl", prefs))
    assert (record["kind"], record["chosen"]) == ("preference", "Hi!")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"message_tree_id": "t", "prompt": {}}, "oasst"),
        ({"message_id": "a", "parent_id": None, "role": "prompter", "text": "x"}, "oasst"),
        ({"conversations": []}, "sharegpt"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "hh_rlhf"),
        ({"chosen": "b", "rejected": "c", "prompt": "a"}, "jsonl"),
        ({"instruction": "a", "context": "", "response": "b"}, "dolly"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"question": "a", "answer": "b"}, "jsonl"),
    ],
)
def test_guess_format(row, expected):
    assert formats.guess_format(row) == expected


# ----------------------------------------------------------------------------- errors


def test_malformed_jsonl_names_file_line_and_keys(tmp_path):
    good = {"instruction": "a", "input": "", "output": "b"}
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "a", "input": "x"}) + "\n")
    message = data_error(path)
    assert f"{path} line 2" in message and "'output'" in message and "keys present: instruction, input" in message
    path.write_text(json.dumps(good) + "\n\n" + '{"instruction": "a", \n')
    assert f"{path} line 3: invalid JSON" in data_error(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, output=3)) + "\n")
    assert "line 2" in (message := data_error(path)) and "'output' must be a string, got int" in message
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, output="  ")) + "\n")
    assert "line 2: key 'output' is empty" in data_error(path)


def test_malformed_json_list_names_the_item(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "", "output": "b"}]))
    assert f"{path} item 1: key 'instruction' is empty" in data_error(path)
    path.write_text('[{"instruction": "a",\n "output": }]')
    assert f"{path} line 2: invalid JSON" in data_error(path)


def test_limit_stops_before_a_later_bad_line(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    path.write_text(path.read_text() + "not json\n")
    assert [r["prompt"] for r in formats.load_records(path, limit=2)] == ["q0", "q1"]
    assert "line 4" in data_error(path)


def test_missing_empty_and_unknown(tmp_path):
    assert data_error(tmp_path / "nope.json") == f"data file not found: {tmp_path / 'nope.json'}"
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "empty" in data_error(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    assert "empty" in data_error(tmp_path / "empty.json")
    message = data_error(tmp_path / "empty.json", format="parquet")
    assert "'parquet'" in message and all(name in message for name in formats.FORMATS)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    assert "cannot read" in data_error(tmp_path / "bad.jsonl.gz")
    assert "limit" in data_error(tmp_path / "empty.json", limit=0)


def test_hf_without_datasets_is_a_one_line_data_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    message = data_error("tatsu-lab/alpaca", format="hf")
    assert message.startswith("cannot load HF dataset 'tatsu-lab/alpaca'") and "install `datasets`" in message


def test_hf_rows_are_converted_like_files(monkeypatch):
    calls = []

    def load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        if path == "offline/missing":
            raise ConnectionError("Couldn't reach the Hub\nmore detail")
        if path == "user/qa":
            return [{"q": "Add 1 and 1.", "a": 2}]
        return [{"instruction": "Add 1 and 1.", "input": "", "output": "2"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    (record,) = formats.load_records("user/alpaca:en", format="hf", split="test")
    assert calls == [("user/alpaca", "en", "test")] and record["prompt"] == "Add 1 and 1."
    assert record["task"] == "user/alpaca:en" and record["kind"] == "generation"
    (mapped,) = formats.load_records("user/qa", format="hf", columns={"text": "q", "label": "a"})
    assert (mapped["kind"], mapped["text"], mapped["label"]) == ("classification", "Add 1 and 1.", "2")
    message = data_error("offline/missing", format="hf")
    assert "Couldn't reach the Hub" in message and "check network" in message


# ----------------------------------------------------------------------------- templates


def test_plain_chatml_alpaca_and_none_renderings():
    record = {"prompt": "Name a colour.", "response": "Blue.", "system": "Be brief."}
    assert formats.render_prompt(record) == "Be brief.\nName a colour.\n"  # the corpus layout: prompt \n response
    assert templates.record_segments(record) == [("Be brief.\nName a colour.\n", False), ("Blue.", True)]
    assert formats.render_prompt(record, "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert formats.render_prompt({"prompt": "Hi"}, "alpaca") == (
        f"{templates.ALPACA_PREAMBLE}\n\n### Instruction:\nHi\n\n### Response:\n"
    )
    assert formats.render_prompt(record, "none") == "Name a colour."
    assert templates.record_segments(record, "chatml")[-1] == ("Blue.<|im_end|>", True)
    with pytest.raises(ConfigError, match="unknown template 'jinja'"):
        formats.render_prompt(record, "jinja")


def test_render_chat_multi_turn_and_prompt_agree():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello "},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    text = templates.render_chat(messages, "plain")
    assert text == "User: Hi\nAssistant: Hello\nUser: Bye\nAssistant: Bye!"
    record = {"kind": "chat", "messages": messages}
    assert formats.render_prompt(record) + "Bye!" == text
    segments = templates.record_segments(record, "plain")
    assert [t for t, trainable in segments if trainable] == ["Hello", "Bye!"]
    assert "".join(t for t, _ in segments) == text
    assert templates.render_chat(messages[:2], "auto", tokenizer=None) == "Hi\nHello"  # no chat template: plain


def test_kto_file_keeps_its_label_as_a_bool_and_a_bad_label_is_one_line(tmp_path):
    rows = [{"prompt": "q1", "completion": "yes it is", "label": True},
            {"prompt": "q2", "completion": "no", "label": 0},
            {"prompt": "q3", "completion": "maybe", "label": " Desirable"},
            {"prompt": "q4", "completion": "", "label": "FALSE"},
            {"prompt": "q5", "completion": "x", "label": "undesirable"},
            {"prompt": "q6", "completion": "y", "label": 1}]
    records = formats.load_records(write_jsonl(tmp_path / "kto.jsonl", rows))
    assert [r["kind"] for r in records] == ["unpaired"] * 6
    assert [r["label"] for r in records] == [True, False, True, False, False, True]
    assert records[0]["completion"] == "yes it is" and records[3]["completion"] == ""
    (tmp_path / "kto.csv").write_text("question,completion,label\nq1,good,1\nq2,bad,0\nq3,ok,true\n")
    assert [r["label"] for r in formats.load_records(tmp_path / "kto.csv")] == [True, False, True]
    mapped = formats.load_records(write_jsonl(tmp_path / "thumbs.jsonl", [{"q": "a", "c": "b", "up": "false"}]),
                                  columns={"prompt": "q", "completion": "c", "label": "up"})
    assert mapped[0]["kind"] == "unpaired" and mapped[0]["label"] is False
    message = data_error(write_jsonl(tmp_path / "bad.jsonl", rows[:1] + [{"prompt": "q", "completion": "c",
                                                                            "label": "maybe"}]))
    assert "bad.jsonl line 2" in message and "'maybe'" in message and "desirable" in message and "1/0" in message
    # a prompt/response file with a class-like label stays a generation file (PubMedQA as JSONL)
    plain = formats.load_records(write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "response": "yes", "label": "yes"}]))
    assert plain[0]["kind"] == "generation"
