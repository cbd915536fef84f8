"""Issue 16: a result always belongs to its config, splits say what they used, every result carries its
baselines and keeps its adapter, prompts fit the model, Ctrl-C and kills resume, one run per directory."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_helpers import cell_processes
from process_helpers import cli as _cli

from tunelab.errors import ConfigError

CONFIG = ("name: exp\noutput_dir: {runs}\nmodel: {{name: '{model}'}}\n"
          "data: {{tasks: [summarization], domain: medical, train_size: 16, eval_size: 0, test_size: 4}}\n"
          "train: {{max_steps: {steps}, batch_size: 4, save_every: {save_every}, log_every: 1}}\n"
          "method: {{name: lora, options: {{r: 2, target_modules: [q_proj, v_proj]}}}}\n"
          "eval: {{max_new_tokens: 4, latency_batches: 0}}\n")


def _config(tmp: Path, model: Path, steps: int = 2, save_every: str = "null", runs: str = "runs") -> Path:
    path = tmp / f"exp-{runs}.yaml"
    path.write_text(CONFIG.format(runs=tmp / runs, model=model, steps=steps, save_every=save_every))
    return path


def _process(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunelab.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"process ended early: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared")
        time.sleep(0.05)


# ------------------------------------------------------------------------ item 1: cell identity
def test_changed_config_reruns_and_results_carry_baselines_adapter_predictions(tmp_path, small_model_dir, capsys):
    config = _config(tmp_path, small_model_dir)
    code, out, err = _cli(capsys, "run", str(config), "--in-process")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "exp"
    result_path = run_dir / "results" / "lora-n16-s0.json"
    result = json.loads(result_path.read_text())
    # item 3: baselines, flags, samples; item 2: sizes used
    assert "score" in result["baselines"]["untuned"] and result["baselines"]["majority_class"] is None
    assert isinstance(result["flags"], list) and result["sample_predictions"]
    assert result["data_sizes"] == {"train": 16, "train_requested": 16, "validation": 0, "test": 4}
    assert list((run_dir / "baselines").glob("*.json"))
    assert "Baselines and checks" in (run_dir / "report.md").read_text()
    # item 4: adapter (both formats) and predictions kept; generate works on them
    adapter = run_dir / "adapters" / "lora-n16-s0"
    assert (adapter / "peft" / "adapter_config.json").is_file()
    assert len((run_dir / "predictions" / "lora-n16-s0.jsonl").read_text().splitlines()) == 4
    code, _, err = _cli(capsys, "generate", "hello", "--model", str(small_model_dir), "--adapter", str(adapter),
                        "--max-new-tokens", "2")
    assert code == 0, err
    # item 15: usual file modes
    assert stat.S_IMODE(result_path.stat().st_mode) == 0o666 & ~_umask()
    # unchanged: skipped; changed learning rate: runs again, old result superseded, config.yaml matches
    code, out, _ = _cli(capsys, "run", str(config), "--in-process")
    assert code == 0 and "done already, skipped" in out
    code, out, err = _cli(capsys, "run", str(config), "--in-process", "train.learning_rate=0.002")
    assert code == 0, err
    assert "config changed" in out and "skipped" not in out
    new = json.loads(result_path.read_text())
    assert new["cell_key"] != result["cell_key"] and new["config"]["train"]["learning_rate"] == 0.002
    assert (run_dir / "results" / "superseded" / "lora-n16-s0.json").is_file()
    assert "learning_rate: 0.002" in (run_dir / "config.yaml").read_text()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_changed_data_file_changes_the_cell_key(tmp_path):
    from tunelab.experiments.grid import cell_key, expand_grid
    from tunelab.experiments.spec import validate

    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    cell = expand_grid(validate({"name": "x", "data": {"source": str(data)}}))[0]
    before = cell_key(cell)
    data.write_text('{"prompt": "a", "response": "c"}\n')
    assert cell_key(cell) != before


def test_non_ascii_labels_keep_distinct_run_ids_and_clashes_fail_at_load(tmp_path):
    from tunelab.experiments.grid import expand_grid
    from tunelab.experiments.spec import load_spec

    path = tmp_path / "x.yaml"
    path.write_text("name: x\ngrid: {methods: [{name: lora, label: α}, {name: lora, label: β}]}\n", encoding="utf-8")
    assert [c.run_id for c in expand_grid(load_spec(path))] == ["α-n800-s0", "β-n800-s0"]
    path.write_text("name: x\ngrid: {methods: [{name: lora, label: 'a b'}, {name: full, label: 'a/b'}]}\n")
    with pytest.raises(ConfigError, match="both become"):
        load_spec(path)


# ------------------------------------------------------------------------ item 2: splits
def _rows(path: Path, count: int, key: str = "prompt") -> Path:
    path.write_text("".join(json.dumps({key: f"q{i}", "response": f"a{i}"}) + "\n" for i in range(count)))
    return path


def test_splits_record_what_they_used_and_warn(tmp_path):
    from tunelab.experiments.data import build_splits
    from tunelab.experiments.spec import DataSpec

    notes: list[str] = []
    data = DataSpec(source=str(_rows(tmp_path / "a.jsonl", 30)), train_size=120, eval_size=5, test_size=10)
    train, validation, test, _ = build_splits(data, notes=notes)
    assert (len(train), len(validation), len(test)) == (15, 5, 10)
    assert len(notes) == 1 and "training on 15" in notes[0]


def test_test_source_is_scored_whole_unless_a_sample_is_asked_for(tmp_path):
    from tunelab.experiments.data import build_splits
    from tunelab.experiments.spec import DataSpec

    source, test_file = _rows(tmp_path / "a.jsonl", 20), _rows(tmp_path / "t.jsonl", 237)
    whole = build_splits(DataSpec(source=str(source), test_source=str(test_file), eval_size=0))[2]
    assert len(whole) == 237
    sample = build_splits(DataSpec(source=str(source), test_source=str(test_file), eval_size=0, test_size=50))[2]
    assert len(sample) == 50 and [r["prompt"] for r in sample] != [f"q{i}" for i in range(50)]  # not the first rows


def test_test_columns_map_a_test_file_named_differently(tmp_path):
    from tunelab.experiments.data import build_splits
    from tunelab.experiments.spec import DataSpec

    (tmp_path / "train.tsv").write_text("text\tanswer\n" + "".join(f"t{i}\t{'yes' if i % 2 else 'no'}\n" for i in range(8)))
    (tmp_path / "test.tsv").write_text("text\tlabel\n" + "".join(f"u{i}\tyes\n" for i in range(5)))
    data = DataSpec(source=str(tmp_path / "train.tsv"), test_source=str(tmp_path / "test.tsv"), eval_size=0,
                    columns={"text": "text", "label": "answer"}, test_columns={"text": "text", "label": "label"})
    train, _, test, labels = build_splits(data, label_key="label")
    assert len(train) == 8 and len(test) == 5 and labels == ["no", "yes"]


def test_integer_columns_list_fields_and_end_markers(tmp_path):
    from tunelab.experiments.data import build_splits
    from tunelab.experiments.spec import DataSpec

    (tmp_path / "plain.tsv").write_text("".join(f"t{i}\t{i % 2}\n" for i in range(6)))
    data = DataSpec.model_validate({"source": str(tmp_path / "plain.tsv"), "columns": {"text": 0, "label": 1},
                                    "eval_size": 0, "test_size": 2})
    assert build_splits(data, label_key="label")[3] == ["0", "1"]
    rows = [{"prompt": ["first sentence.", "second."], "response": ["ref one", "ref two"]} for _ in range(4)]
    rows.append({"prompt": "x", "response": "y ###eos_token###"})
    (tmp_path / "lists.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    notes: list[str] = []
    splits = build_splits(DataSpec(source=str(tmp_path / "lists.jsonl"), eval_size=0, test_size=1), notes=notes)
    record = next(r for r in splits[0] + splits[2] if "references" in r)
    assert record["prompt"] == "first sentence.\nsecond." and record["references"] == ["ref one", "ref two"]
    assert any("###eos_token###" in note for note in notes)


# ------------------------------------------------------------------------ item 3 and 5: metrics, prompt length
def test_macro_f1_exposes_a_majority_class_classifier():
    from tunelab.eval.tasks import macro_f1

    refs = ["a"] * 9 + ["b"]
    assert macro_f1(["a"] * 10, refs) == pytest.approx((2 * 9 / 19 + 0) / 2)
    assert macro_f1(refs, refs) == 1.0


def test_generation_truncates_prompts_to_the_model_positions(small_model_dir):
    from tunelab.eval.generate import greedy, truncate_left
    from tunelab.models import zoo

    model, tokenizer = zoo.load(str(small_model_dir))
    limit = model.config.max_position_embeddings
    long_prompt = " ".join(["the patient"] * (2 * limit))
    assert len(greedy(model, tokenizer, [long_prompt], max_new_tokens=3, progress=False)) == 1  # no index error
    assert truncate_left([1, 5, 6, 7, 8], 3, bos=1) == [1, 7, 8]
    short = greedy(model, tokenizer, [long_prompt], max_new_tokens=3, progress=False, max_prompt_tokens=16)
    assert short == greedy(model, tokenizer, [" ".join(long_prompt.split()[-40:])], max_new_tokens=3,
                           progress=False, max_prompt_tokens=16)


# ------------------------------------------------------------------------ items 6-8: interruptions, lock
def test_second_run_on_a_locked_run_directory_is_one_line(tmp_path, small_model_dir, capsys):
    from tunelab.experiments.rundir import RunLock

    config = _config(tmp_path, small_model_dir)
    lock = RunLock(tmp_path / "runs" / "exp").acquire()
    try:
        code, _, err = _cli(capsys, "run", str(config), "--in-process")
    finally:
        lock.release()
    assert code == 2 and err.count("\n") == 1 and "in use by another tunelab run" in err


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_exits_130_with_the_resume_command_and_killing_the_parent_leaves_no_cell(tmp_path, small_model_dir):
    config = _config(tmp_path, small_model_dir, steps=100000, save_every="5")
    run_dir = tmp_path / "runs" / "exp"
    process = _process("run", str(config), start_new_session=True)
    _wait_for(run_dir / ".work" / "lora-n16-s0" / "train" / "checkpoint", process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: interrupted") and "--resume" in lines[-1] and "Traceback" not in err
    assert not cell_processes(run_dir)
    # SIGKILL of the parent alone: the cell process dies with it
    process = _process("run", str(config))
    deadline = time.monotonic() + 120
    while not cell_processes(run_dir):
        assert process.poll() is None and time.monotonic() < deadline, "the cell process never started"
        time.sleep(0.05)
    time.sleep(1.0)  # let the cell get past its start (the watchdog is armed first thing)
    process.kill()
    process.communicate()
    deadline = time.monotonic() + 10
    while cell_processes(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not cell_processes(run_dir)


@pytest.mark.integration
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_sigkilled_cell_resumes_from_its_checkpoint_to_the_uninterrupted_result(tmp_path, small_model_dir):
    from safetensors.torch import load_file

    straight = _process("run", str(_config(tmp_path, small_model_dir, steps=6, save_every="2", runs="straight")))
    config = _config(tmp_path, small_model_dir, steps=6, save_every="2", runs="killed")
    killed = _process("run", str(config), env={**os.environ, "TUNELAB_KILL_AT_STEP": "5"})
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == 1 and "killed (signal 9)" in err
    work = tmp_path / "killed" / "exp" / ".work" / "lora-n16-s0" / "train"
    assert json.loads((work / "checkpoint" / "state.json").read_text())["step"] == 4  # kept, not deleted
    resumed = _process("run", str(config), "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    results = [json.loads((tmp_path / r / "exp" / "results" / "lora-n16-s0.json").read_text())
               for r in ("straight", "killed")]
    assert results[0]["metrics"] == results[1]["metrics"]
    losses = [[h["loss"] for h in r["history"] if "loss" in h] for r in results]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    weights = [load_file(next((tmp_path / r / "exp" / "adapters" / "lora-n16-s0").glob("*.safetensors")))
               for r in ("straight", "killed")]
    assert weights[0].keys() == weights[1].keys()
    assert all(bool((weights[0][k] == weights[1][k]).all()) for k in weights[0])


def test_staged_cell_resumes_in_the_stage_it_stopped_in(tmp_path, small_model_dir):
    from tunelab.experiments.grid import expand_grid
    from tunelab.experiments.runner import run_cell
    from tunelab.experiments.spec import load_spec

    config = _config(tmp_path, small_model_dir, steps=2)
    config.write_text(config.read_text() + "stages: [{name: first}, {name: second, train: {max_steps: 3}}]\n")
    cell = expand_grid(load_spec(config))[0]
    straight = run_cell(cell, tmp_path / "straight", progress=False)
    # a run that finished stage one, then died: stage one is restored, not retrained
    partial = tmp_path / "partial"
    run_cell(cell, partial, progress=False)
    for path in (partial / ".work" / cell.run_id).glob("*-1*"):
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
    resumed = run_cell(cell, partial, progress=False)
    assert resumed["stage_matrix"]["scores"] == straight["stage_matrix"]["scores"]
    assert [h.get("loss") for h in resumed["history"]] == [h.get("loss") for h in straight["history"]]


def test_readme_api_is_reproducible_when_seeded_before_apply(small_model_dir):
    from tunelab import tuners
    from tunelab.models import zoo
    from tunelab.utils import seed_everything

    states = []
    for _ in range(2):
        model, _ = zoo.load(str(small_model_dir))
        seed_everything(0)  # as the README shows: adapters initialise from the global RNG
        tuners.apply(model, "lora", r=2, target_modules="all-linear")
        states.append({name: p.detach().clone() for name, p in tuners.trainable_parameters(model)})
    assert all(bool((states[0][k] == states[1][k]).all()) for k in states[0])


def test_cell_key_follows_a_local_model_directory(tmp_path, small_model_dir):
    """Item 1: a model directory whose files change makes its cells stale (name, size, mtime)."""
    import shutil

    from tunelab.experiments.grid import cell_key, expand_grid
    from tunelab.experiments.spec import validate

    model_dir = tmp_path / "model"
    shutil.copytree(small_model_dir, model_dir)
    spec = validate({"name": "x", "model": {"name": str(model_dir)}})
    before = cell_key(expand_grid(spec)[0])
    assert cell_key(expand_grid(spec)[0]) == before  # stable
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text() + "\n")
    assert cell_key(expand_grid(spec)[0]) != before
