"""A corpus of bad inputs: every one is exit code 2, one line on stderr, no traceback, nothing written.

Configs, data files, model and adapter directories and CLI usage mistakes, as a new user makes them.
Every case runs against an output directory that either does not exist yet (it must not appear) or
holds an earlier run (it must not change). Most fail at load time or in preflight on a tiny random
model, so the corpus stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tunelab.cli import main

BASE = ("name: exp\noutput_dir: {runs}\nmodel: {{name: '{model}'}}\n"
        "data: {{tasks: [summarization], domain: medical, train_size: 16, eval_size: 0, test_size: 4}}\n"
        "train: {{max_steps: 2, batch_size: 4}}\neval: {{max_new_tokens: 4, latency_batches: 0}}\n")


def _data(tmp: Path, name: str, text: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _file_data(tmp: Path, name: str, text: str | bytes, extra: str = "") -> str:
    path = _data(tmp, name, text)
    return f"data: {{source: '{path}', train_size: 4, eval_size: 0, test_size: 2{extra}}}\n"


GOOD_ROWS = "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(12))
LABEL_ROWS = "".join(json.dumps({"text": f"t{i}", "label": "yes" if i % 2 else "no"}) + "\n" for i in range(12))
PAIR_ROWS = "".join(json.dumps({"prompt": f"q{i}", "chosen": "good", "rejected": "bad"}) + "\n" for i in range(12))

# id -> (extra YAML appended to BASE (later keys override earlier sections), expected fragment)
CONFIGS = {
    "unknown-section": ("bogus: 1\n", "bogus"),
    "unknown-train-key": ("train: {max_stepz: 3}\n", "max_stepz"),
    "max-steps-true": ("train: {max_steps: true}\n", "boolean"),
    "max-steps-float": ("train: {max_steps: 2.5}\n", "max_steps"),
    "max-steps-zero": ("train: {max_steps: 0}\n", "max_steps"),
    "lr-inf": ("train: {learning_rate: .inf}\n", "learning_rate"),
    "lr-nan": ("train: {learning_rate: .nan}\n", "learning_rate"),
    "lr-huge": ("train: {learning_rate: 1.0e+30}\n", "learning_rate"),
    "lr-negative": ("train: {learning_rate: -0.1}\n", "learning_rate"),
    "lr-text": ("train: {learning_rate: fast}\n", "learning_rate"),
    "seed-65-bits": ("train: {seed: 36893488147419103232}\n", "seed"),
    "seed-negative": ("train: {seed: -1}\n", "seed"),
    "data-seed-huge": ("data: {seed: 18446744073709551616}\n", "seed"),
    "model-seed-huge": ("model: {name: tiny-llama, seed: 18446744073709551616}\n", "seed"),
    "grid-seed-huge": ("grid: {seeds: [0, 18446744073709551616]}\n", "seeds"),
    "train-size-true": ("data: {train_size: true}\n", "boolean"),
    "test-size-zero": ("data: {test_size: 0}\n", "test_size"),
    "unknown-template": ("data: {template: alpacca}\n", "template"),
    "unknown-task": ("data: {tasks: [poetry], train_size: 4, test_size: 2}\n", "poetry"),
    "unknown-objective": ("objective: sftt\n", "sftt"),
    "unknown-objective-option": ("objective: {name: sft, options: {bogus: 1}}\n", "bogus"),
    "unknown-method": ("method: {name: lorax}\n", "lorax"),
    "unknown-method-option": ("method: {name: lora, options: {rank: 4}}\n", "rank"),
    "rank-zero": ("method: {name: lora, options: {r: 0}}\n", "r"),
    "targets-match-nothing": ("method: {name: lora, options: {target_modules: [qq_proj]}}\n", "qq_proj"),
    "virtual-tokens-huge": ("method: {name: prompt_tuning, options: {num_virtual_tokens: 100000000}}\n",
                            "num_virtual_tokens"),
    "max-new-tokens-zero": ("eval: {max_new_tokens: 0}\n", "max_new_tokens"),
    "cross-stages-bogus": ("eval: {cross_stages: sometimes}\n", "cross_stages"),
    "stages-same-name": ("stages: [{name: a}, {name: a}]\n", "two stages"),
    "stage-unknown-train-key": ("stages: [{train: {bogus: 1}}]\n", "bogus"),
    "name-with-slash": ("name: a/b\n", "name"),
    "name-5000-chars": ("name: " + "n" * 5000 + "\n", "name"),
    "label-300-chars": ("grid: {methods: [{name: lora, label: " + "l" * 300 + "}]}\n", "label"),
    "labels-clash": ("grid: {methods: [{name: lora, label: 'a!'}, {name: full, label: 'a?'}]}\n", "both become"),
    "labels-equal": ("grid: {methods: [{name: lora, label: x}, {name: full, label: x}]}\n", "share a label"),
    "grid-param-unknown": ("grid: {params: {train.bogus: [1, 2]}}\n", "bogus"),
    "grid-method-lr-huge": ("grid: {methods: [{name: lora, train: {learning_rate: 1.0e+9}}]}\n", "learning_rate"),
    "classification-on-generation": ("objective: classification\n", "label"),
}


def _merged(base: str, extra: str) -> str:
    """``base`` with the sections of ``extra`` merged in (a YAML file may not repeat a key)."""
    import yaml

    tree = yaml.safe_load(base)
    for key, value in (yaml.safe_load(extra) or {}).items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return yaml.safe_dump(tree, sort_keys=False)


def _config_cases(tmp: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    cases = {}
    runs = tmp / "runs"
    for name, (extra, fragment) in CONFIGS.items():
        path = tmp / f"{name}.yaml"
        path.write_text(_merged(BASE.format(runs=runs, model=model), extra))
        cases[f"config-{name}"] = (["run", str(path)], fragment)
    raw = {
        "non-utf8": (b"name: \xff\xfe exp\n", "UTF-8"),
        "duplicate-top-key": ((BASE.format(runs=runs, model=model) + "name: other\n").encode(), "twice"),
        "malformed": (b"name: x\ntrain: [1, 2\n", "malformed YAML"),
        "top-level-list": (b"- 1\n- 2\n", "mapping"),
        "nested-duplicate": (BASE.format(runs=runs, model=model).replace(
            "train: {", "train: {batch_size: 2, ").encode(), "twice"),
    }
    for name, (text, fragment) in raw.items():
        path = _data(tmp, f"{name}.yaml", text)
        cases[f"yaml-{name}"] = (["run", str(path)], fragment)
    data = {
        "missing-file": (None, "not found"),
        "empty-file": (_file_data(tmp, "empty.jsonl", ""), "empty"),
        "malformed-row": (_file_data(tmp, "bad.jsonl", GOOD_ROWS + '{"prompt": "x"\n'), "bad.jsonl"),
        "unknown-columns": (_file_data(tmp, "cols.jsonl", '{"foo": 1, "bar": 2}\n'), "foo"),
        "unknown-canonical": (_file_data(tmp, "canon.jsonl", GOOD_ROWS, ", columns: {questn: foo}"), "questn"),
        "unknown-format": (_file_data(tmp, "fmt.jsonl", GOOD_ROWS, ", format: parquet"), "parquet"),
        "ragged-csv": (_file_data(tmp, "ragged.csv", "prompt,response\na,b\nc,d,e\n"), "ragged.csv"),
        "non-utf8-data": (_file_data(tmp, "latin.jsonl", b'{"prompt": "\xe9", "response": "x"}\n'), "latin.jsonl"),
        "preference-under-sft": (_file_data(tmp, "pairs.jsonl", PAIR_ROWS), "preference"),
        "missing-test-source": (_file_data(tmp, "rows.jsonl", GOOD_ROWS, f", test_source: '{tmp / 'nope.jsonl'}'"),
                                "nope.jsonl"),
        "test-source-wrong-kind": (_file_data(tmp, "rows2.jsonl", GOOD_ROWS,
                                              f", test_source: '{_data(tmp, 'labels.jsonl', LABEL_ROWS)}'"),
                                   "classification"),
    }
    for name, (section, fragment) in data.items():
        section = section or f"data: {{source: '{tmp / 'absent.jsonl'}'}}\n"
        path = tmp / f"data-{name}.yaml"
        path.write_text(_merged(BASE.format(runs=runs, model=model), section))
        cases[f"data-{name}"] = (["run", str(path)], fragment)
    return cases


def _model_cases(tmp: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty-model"
    empty.mkdir()
    corrupt = tmp / "corrupt-model"
    shutil.copytree(model, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    bad_config = tmp / "bad-config-model"
    shutil.copytree(model, bad_config)
    (bad_config / "config.json").write_text("{not json")
    cases = {}
    for name, path in (("missing", tmp / "no-model"), ("empty", empty), ("truncated-weights", corrupt),
                       ("bad-config", bad_config)):
        config = tmp / f"model-{name}.yaml"
        config.write_text(BASE.format(runs=tmp / "runs", model=path))
        cases[f"model-{name}"] = (["run", str(config)], "model")
        cases[f"generate-model-{name}"] = (["generate", "hi", "--model", str(path)], "model")
    return cases


def _adapter_cases(tmp: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    import torch
    from safetensors.torch import load_file, save_file

    from tunelab import tuners
    from tunelab.models import zoo

    loaded, _ = zoo.load(str(model))
    tuners.apply(loaded, "lora", r=2, target_modules=["q_proj"])
    good = tmp / "good-adapter"
    tuners.save(loaded, good, format="peft")
    weights = next(good.glob("*.safetensors"))

    def variant(name: str, edit) -> Path:
        path = tmp / f"adapter-{name}"
        shutil.copytree(good, path)
        edit(path)
        return path

    def nan(path: Path) -> None:
        tensors = load_file(path / weights.name)
        first = next(iter(tensors))
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, path / weights.name)

    def pickled(path: Path) -> None:
        (path / weights.name).unlink()
        torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")

    adapters = {
        "missing": tmp / "no-adapter",
        "a-file": _data(tmp, "adapter.txt", "not a directory"),
        "empty-dir": variant("empty", lambda p: [f.unlink() for f in p.iterdir()]),
        "corrupt-weights": variant("corrupt", lambda p: (p / weights.name).write_bytes(b"\x00" * 64)),
        "malformed-config": variant("malformed", lambda p: (p / "adapter_config.json").write_text("{nope")),
        "config-not-object": variant("list", lambda p: (p / "adapter_config.json").write_text("[1, 2]")),
        "pickle": variant("pickle", pickled),
        "nan-weights": variant("nan", nan),
    }
    return {f"adapter-{name}": (["generate", "hi", "--model", str(model), "--adapter", str(path)], "adapter")
            for name, path in adapters.items()}


def _report_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    missing_fields = tmp / "report-missing-fields"
    (missing_fields / "results").mkdir(parents=True)
    (missing_fields / "results" / "a.json").write_text(json.dumps({"run_id": "a", "metrics": {"score": 1}}))
    not_json = tmp / "report-not-json"
    (not_json / "results").mkdir(parents=True)
    (not_json / "results" / "a.json").write_text("{")
    return {
        "report-missing-run": (["report", str(tmp / "nothing")], "no results"),
        "report-missing-fields": (["report", str(missing_fields)], "lacks"),
        "report-not-json": (["report", str(not_json)], "not valid JSON"),
    }


USAGE = {
    "no-command": [],
    "run-without-config": ["run"],
    "misspelt-command": ["trian", "x"],
    "unknown-option": ["run", "x.yaml", "--bogus"],
    "report-without-dir": ["report"],
    "generate-without-prompt": ["generate"],
    "bad-option-value": ["generate", "hi", "--max-new-tokens", "many"],
    "pretrain-unknown-preset": ["pretrain", "huge-llama"],
    "override-without-equals": ["run", "{config}", "novalue"],
    "override-empty-key": ["run", "{config}", "=3"],
    "override-bad-value": ["run", "{config}", "train.max_steps=-1"],
    "resume-without-run": ["run", "{config}", "name=never-run", "--resume"],
    "config-missing": ["run", "/nonexistent/x.yaml"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_model_dir) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    good = tmp / "good.yaml"
    good.write_text(BASE.format(runs=tmp / "runs", model=small_model_dir))
    cases = {f"usage-{name}": ([a.replace("{config}", str(good)) for a in args], "")
             for name, args in USAGE.items()}
    cases |= _config_cases(tmp, small_model_dir)
    cases |= _model_cases(tmp, small_model_dir)
    cases |= _adapter_cases(tmp, small_model_dir)
    cases |= _report_cases(tmp)
    file_out = tmp / "file-out"
    file_out.write_text("a file")
    config = tmp / "output-dir-is-a-file.yaml"
    config.write_text(BASE.format(runs=file_out, model=small_model_dir))
    cases["output-dir-is-a-file"] = (["run", str(config)], "is a file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp / "read-only"
        locked.mkdir(mode=0o555)
        config = tmp / "output-dir-unwritable.yaml"
        config.write_text(BASE.format(runs=locked / "runs", model=small_model_dir))
        cases["output-dir-unwritable"] = (["run", str(config)], "cannot write")
    return tmp, cases


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def test_the_corpus_is_large(corpus):
    assert len(corpus[1]) >= 60


def test_every_bad_input_is_one_line_and_writes_nothing(corpus, capsys):
    tmp, cases = corpus
    runs = tmp / "runs"
    failures = []
    for index, (name, (args, fragment)) in enumerate(sorted(cases.items())):
        shutil.rmtree(runs, ignore_errors=True)
        if index % 2:  # half the cases meet an earlier run, which must stay as it was
            (runs / "exp" / "results").mkdir(parents=True)
            (runs / "exp" / "results" / "old.json").write_text('{"keep": true}')
        before = _snapshot(runs)
        capsys.readouterr()
        code = main(args)
        _, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"{len(lines)} stderr lines")
        if "Traceback" in err:
            problems.append("traceback")
        if fragment and lines and fragment.lower() not in lines[0].lower():
            problems.append(f"message lacks {fragment!r}")
        if _snapshot(runs) != before:
            problems.append("run directory created or changed")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}: {err.strip()[-300:]}")
    assert not failures, "\n".join(failures)
