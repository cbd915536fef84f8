"""Run an experiment: every grid cell trains, evaluates and writes ``results/<run>.json``.

Order of work, chosen so that a mistake never leaves a half-written run directory:

1. validate the whole spec and expand the grid (pure, nothing written);
2. preflight: build the data splits, load the model once and apply every method of the grid to a copy
   (unknown options, target modules that match nothing, bad data rows all fail here);
3. only then create ``runs/<name>/``; each cell trains in a scratch folder ``.work/<run>/`` and its
   result file is written atomically when it is complete; finished cells are skipped on a rerun;
4. the report is rebuilt from the result files (:mod:`tunelab.experiments.report`).

By default each cell runs in a fresh Python subprocess, so that its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from tunelab.errors import TunelabError
from tunelab.experiments.data import build_splits
from tunelab.experiments.spec import Cell, ExperimentSpec, expand_grid
from tunelab.utils import atomic_write_json, atomic_write_text, seed_everything

MODEL_TASK = {"sft": "causal_lm", "classification": "sequence_classification",
              "token_classification": "token_classification"}
HEAD_NAMES = ("score", "classifier")  # heads that transformers adds for classification tasks


def load_model_for(spec: ExperimentSpec, labels: list[str] | None, progress: bool = True):
    from tunelab.models import zoo

    return zoo.load(spec.model.name, task=MODEL_TASK[spec.objective], seed=spec.model.seed,
                    label_names=labels, progress=progress)


def apply_method(model, spec: ExperimentSpec):
    """Apply the cell's method; a task head added by tunelab (``classifier``/``score``) always trains.

    Methods that support PEFT's ``modules_to_save`` get the head there (so it is saved with the
    adapter); for the others, the head's parameters are simply unfrozen.
    """
    from tunelab import tuners
    from tunelab.tuners import registry

    options = dict(spec.method.options)
    heads = []
    if spec.objective != "sft" and spec.method.name != "full":
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        heads = [name for name in HEAD_NAMES if name in leaf_names]
        fields = registry.get(spec.method.name).config_class.model_fields
        if heads and "modules_to_save" in fields and not options.get("modules_to_save"):
            options["modules_to_save"] = heads
            heads = []
    model = tuners.apply(model, spec.method.name, **options)
    for name, parameter in model.named_parameters():
        if any(part in heads for part in name.split(".")):
            parameter.requires_grad_(True)
    return model


def preflight(cells: list[Cell], progress: bool = True) -> None:
    """Fail fast, before anything is written: data, model and every method's options and targets."""
    labels_by_data: dict[str, list[str] | None] = {}
    base_cache: dict[str, Any] = {}
    seen_methods: set[str] = set()
    for cell in cells:
        spec = cell.spec
        data_key = f"{spec.objective}/{spec.data.model_dump_json()}"
        if data_key not in labels_by_data:
            labels_by_data[data_key] = build_splits(spec.data, spec.objective)[3]
        labels = labels_by_data[data_key]
        model_key = f"{spec.model.name}/{spec.model.seed}/{spec.objective}"
        if model_key not in base_cache:
            base_cache[model_key] = load_model_for(spec, labels, progress=progress)[0]
        method_key = f"{model_key}/{spec.method.name}/{json.dumps(spec.method.options, sort_keys=True, default=str)}"
        if method_key not in seen_methods:
            apply_method(copy.deepcopy(base_cache[model_key]), spec)
            seen_methods.add(method_key)


def run_experiment(spec: ExperimentSpec, progress: bool = True, isolate: bool = True,
                   console=None) -> list[dict]:
    """Run every cell of ``spec`` (skipping finished ones) and rebuild the report."""
    from tunelab.experiments.report import write_report

    cells = expand_grid(spec)
    run_dir = spec.run_dir
    pending = [cell for cell in cells if not (run_dir / "results" / f"{cell.run_id}.json").exists()]
    if pending:
        preflight(pending, progress=progress)
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    for index, cell in enumerate(cells, start=1):
        result_path = run_dir / "results" / f"{cell.run_id}.json"
        if result_path.exists():
            _say(console, f"[{index}/{len(cells)}] {cell.run_id}: done already, skipped")
            continue
        _say(console, f"[{index}/{len(cells)}] {cell.run_id}: training {cell.spec.method.name}")
        if isolate:
            _run_cell_subprocess(cell, run_dir)
        else:
            atomic_write_json(result_path, run_cell(cell, run_dir, progress=progress))
        result = json.loads(result_path.read_text())
        _say(console, f"    score {result['metrics'].get('score', float('nan')):.4f}, "
                      f"{result['trainable_parameters']:,} trainable parameters, {result['train_seconds']:.0f} s")
    write_report(run_dir)
    return [json.loads((run_dir / "results" / f"{c.run_id}.json").read_text()) for c in cells]


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


def _run_cell_subprocess(cell: Cell, run_dir: Path) -> None:
    work = run_dir / ".work" / cell.run_id
    work.mkdir(parents=True, exist_ok=True)
    (work / "cell.json").write_text(cell.model_dump_json())
    completed = subprocess.run([sys.executable, "-m", "tunelab.experiments.cell", str(run_dir), cell.run_id],
                               stderr=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
        if completed.returncode == 2 and lines and lines[-1].startswith("error: "):
            raise TunelabError(f"run {cell.run_id}: {lines[-1].removeprefix('error: ')}")
        sys.stderr.write(completed.stderr)
        raise RuntimeError(f"run {cell.run_id} failed with exit code {completed.returncode}")


def run_cell(cell: Cell, run_dir: Path, progress: bool = True) -> dict:
    """Train and evaluate one cell; returns its result record (the caller writes it)."""
    from tunelab.train import train
    from tunelab.train.profile import peak_rss_mb

    spec = cell.spec
    seed_everything(spec.train.seed)
    train_records, eval_records, test_records, labels = build_splits(spec.data, spec.objective)
    model, tokenizer = load_model_for(spec, labels, progress=progress)
    model = apply_method(model, spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    collate = _collator(spec, tokenizer, labels)
    work = run_dir / ".work" / cell.run_id
    if work.exists():
        shutil.rmtree(work / "train", ignore_errors=True)
    result = train(model, train_records, collate, spec.train, eval_records=eval_records or None,
                   output_dir=work / "train", progress=progress,
                   param_groups=loraplus_groups(model, spec.train.learning_rate, spec.train.weight_decay))
    started = time.perf_counter()
    metrics = _evaluate(spec, model, tokenizer, test_records, collate, labels, progress)
    eval_seconds = time.perf_counter() - started
    latency = _latency_ms(model, collate, test_records, spec.eval.latency_batches)
    record = {
        "run_id": cell.run_id, "experiment": spec.name, "method": spec.method.name,
        "method_label": cell.method_label, "objective": spec.objective, "model": spec.model.name,
        "train_size": spec.data.train_size, "seed": spec.train.seed,
        "metrics": metrics, "trainable_parameters": trainable, "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "train_seconds": result.train_seconds, "train_tokens_per_second": result.tokens_per_second,
        "eval_seconds": eval_seconds, "inference_latency_ms": latency,
        "peak_memory_mb": peak_rss_mb(), "final_eval_loss": result.final_eval_loss,
        "history": result.history, "config": spec.model_dump(mode="json"),
        "versions": _versions(), "git_sha": _git_sha(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    shutil.rmtree(work, ignore_errors=True)
    return record


def loraplus_groups(model, learning_rate: float, weight_decay: float) -> list[dict] | None:
    """LoRA+ optimizer groups when the method sets ``loraplus_lr_ratio`` (B at lr x ratio); else None."""
    from tunelab.tuners import loraplus

    ratio = loraplus.configured_ratio(model)
    if ratio is None:
        return None
    return loraplus.loraplus_param_groups(model, learning_rate, ratio, weight_decay=weight_decay)


def _collator(spec: ExperimentSpec, tokenizer, labels: list[str] | None):
    from tunelab.data import collate

    if spec.objective == "sft":
        return collate.SFTCollator(tokenizer, max_length=spec.data.max_length, template=spec.data.template)
    if spec.objective == "classification":
        return collate.ClassificationCollator(tokenizer, labels, max_length=spec.data.max_length)
    return collate.TokenClassificationCollator(tokenizer, labels, max_length=spec.data.max_length)


def _evaluate(spec, model, tokenizer, records, collate, labels, progress) -> dict[str, float]:
    from tunelab.eval import tasks

    model.eval()
    if spec.objective == "sft":
        return tasks.evaluate_records(model, tokenizer, records, max_new_tokens=spec.eval.max_new_tokens,
                                      batch_size=spec.eval.batch_size, template=spec.data.template,
                                      progress=progress)
    if spec.objective == "classification":
        return tasks.evaluate_classifier(model, records, collate)
    return tasks.evaluate_tagger(model, records, collate, labels)


@torch.no_grad()
def _latency_ms(model, collate, records: list[dict], batches: int) -> float | None:
    """Median wall time of one forward pass over a batch of 8 test examples, in milliseconds."""
    if batches <= 0 or not records:
        return None
    batch = collate(records[:8])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    model.eval()
    model(**inputs)  # warm-up
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def _versions() -> dict[str, str]:
    import transformers

    import tunelab

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tunelab": tunelab.__version__}


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.getcwd())
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
