"""Run an experiment: every grid cell trains, evaluates and writes ``results/<run>.json``.

The runner knows no objective by name: each stage's objective comes from the registry
(:mod:`tunelab.experiments.registry`), builds its collator, trains through :func:`tunelab.train.train`
and evaluates itself.

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

from tunelab.errors import ConfigError, TunelabError
from tunelab.experiments import registry
from tunelab.experiments.data import build_splits
from tunelab.experiments.spec import Cell, ExperimentSpec, MethodSpec, Stage, expand_grid, resolve_stages
from tunelab.utils import atomic_write_json, atomic_write_text, seed_everything

HEAD_NAMES = ("score", "classifier")  # heads that transformers adds for classification tasks


def load_model(spec: ExperimentSpec, model_task: str, labels: list[str] | None, progress: bool = True):
    """``(model, tokenizer)`` of the spec's model with the head its objective's model task needs."""
    from tunelab.models import zoo

    return zoo.load(spec.model.name, task=model_task, seed=spec.model.seed, label_names=labels, progress=progress)


def apply_method(model, method: MethodSpec, model_task: str, adapter_name: str = "default"):
    """Apply a method; a task head added by tunelab (``classifier``/``score``) always trains.

    Methods that support PEFT's ``modules_to_save`` get the head there (so it is saved with the
    adapter); for the others, the head's parameters are simply unfrozen.
    """
    from tunelab import tuners
    from tunelab.tuners import registry

    options = dict(method.options)
    heads = []
    if model_task != "causal_lm" and method.name != "full":
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        heads = [name for name in HEAD_NAMES if name in leaf_names]
        fields = registry.get(method.name).config_class.model_fields
        if heads and "modules_to_save" in fields and not options.get("modules_to_save") and adapter_name == "default":
            options["modules_to_save"] = heads
            heads = []
    kwargs = {} if adapter_name == "default" else {"adapter_name": adapter_name}
    model = tuners.apply(model, method.name, **options, **kwargs)
    for name, parameter in model.named_parameters():
        if any(part in heads for part in name.split(".")):
            parameter.requires_grad_(True)
    return model


def _stage_splits(stage: Stage, cache: dict | None = None):
    """``(objective entry, (train, validation, test, labels))`` of a stage, cached by data + objective."""
    entry = registry.get_objective(stage.objective.name)
    key = f"{entry.objective_class.label_key}/{stage.data.model_dump_json()}"
    if cache is not None and key in cache:
        return entry, cache[key]
    splits = build_splits(stage.data, entry.objective_class.label_key)
    if cache is not None:
        cache[key] = splits
    return entry, splits


def preflight(cells: list[Cell], progress: bool = True) -> None:
    """Fail fast, before anything is written: data, model and every method's options and targets."""
    split_cache: dict[str, Any] = {}
    base_cache: dict[str, Any] = {}
    seen_methods: set[str] = set()
    for cell in cells:
        spec = cell.spec
        stages = resolve_stages(spec)
        labels = None
        for index, stage in enumerate(stages):
            entry, splits = _stage_splits(stage, split_cache)
            if index == 0:
                labels = splits[3]
            elif splits[3] != labels and entry.model_task != "causal_lm":
                raise ConfigError(f"stage {stage.name!r} has other labels ({splits[3]}) than the first stage "
                                  f"({labels}); stages share one classification head")
        model_task = registry.get_objective(stages[0].objective.name).model_task
        model_key = f"{spec.model.name}/{spec.model.seed}/{model_task}/{labels}"
        if model_key not in base_cache:
            base_cache[model_key] = load_model(spec, model_task, labels, progress=progress)[0]
        methods = [(spec.method, "default")] + [(s.method, s.name) for s in stages if s.method is not None]
        method_key = f"{model_key}/" + json.dumps([(m.name, m.options, a) for m, a in methods], sort_keys=True, default=str)
        if method_key not in seen_methods:
            model = copy.deepcopy(base_cache[model_key])
            for method, adapter_name in methods:
                model = apply_method(model, method, model_task, adapter_name)
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
    """Train and evaluate one cell, stage after stage; returns its result record (the caller writes it).

    Every stage trains the model as the previous stage left it (a stage's ``method`` adds a new adapter
    first), then the model is evaluated on the stage's test data and on every earlier stage's (all
    stages' with ``eval.cross_stages: all``): ``stage_matrix.scores[i][j]`` is the score after stage
    ``i`` on the test data of stage ``j``.
    """
    from tunelab.train import train
    from tunelab.train.profile import peak_rss_mb

    spec = cell.spec
    seed_everything(spec.train.seed)
    stages = resolve_stages(spec)
    work = run_dir / ".work" / cell.run_id
    prepared = []
    for stage in stages:
        entry, (train_records, eval_records, test_records, labels) = _stage_splits(stage)
        prepared.append((stage, entry, train_records, eval_records, test_records, labels))
    model_task = prepared[0][1].model_task
    model, tokenizer = load_model(spec, model_task, prepared[0][5], progress=progress)
    model = apply_method(model, spec.method, model_task)
    objectives, stage_records, history, matrix = [], [], [], []
    train_seconds, tokens_per_second, final_eval_loss = 0.0, 0.0, None
    for index, (stage, _, train_records, eval_records, _, labels) in enumerate(prepared):
        if stage.method is not None:
            model = apply_method(model, stage.method, model_task, adapter_name=stage.name)
            _train_only(model, stage.name)
        objective = registry.build_objective(stage.objective.name, stage.objective.options)
        objective.collator(tokenizer, labels, max_length=stage.data.max_length, template=stage.data.template)
        objectives.append(objective)
        stage_dir = work / ("train" if len(prepared) == 1 else f"train-{index}")
        shutil.rmtree(stage_dir, ignore_errors=True)
        seed_everything(stage.train.seed)
        result = train(model, train_records, objective, stage.train, eval_records=eval_records or None,
                       output_dir=stage_dir, progress=progress,
                       param_groups=loraplus_groups(model, stage.train.learning_rate, stage.train.weight_decay))
        objective.on_stage_end(model, train_records)
        history += [{**event, "stage": stage.name} for event in result.history] if len(prepared) > 1 else result.history
        train_seconds += result.train_seconds
        tokens_per_second, final_eval_loss = result.tokens_per_second, result.final_eval_loss
        started = time.perf_counter()
        row = []
        for other, (_, _, _, _, other_test, _) in enumerate(prepared):
            if other > index and spec.eval.cross_stages == "previous":
                row.append(None)
                continue
            evaluator = objectives[other] if other < len(objectives) else _stage_objective(prepared[other], tokenizer)
            row.append(evaluator.evaluate(model, other_test, max_new_tokens=spec.eval.max_new_tokens,
                                          batch_size=spec.eval.batch_size, progress=progress))
        matrix.append(row)
        stage_records.append({"name": stage.name, "objective": stage.objective.name,
                              "method": stage.method.name if stage.method else None,
                              "train_size": len(train_records), "steps": result.steps,
                              "train_seconds": result.train_seconds, "final_eval_loss": result.final_eval_loss,
                              "eval_seconds": time.perf_counter() - started, "metrics": row[index]})
    metrics = matrix[-1][len(prepared) - 1]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    latency = _latency_ms(model, objectives[-1].collate_fn, prepared[-1][4], spec.eval.latency_batches)
    record = {
        "run_id": cell.run_id, "experiment": spec.name, "method": spec.method.name,
        "method_label": cell.method_label, "objective": spec.objective.name, "model": spec.model.name,
        "train_size": spec.data.train_size, "seed": spec.train.seed,
        "metrics": metrics, "trainable_parameters": trainable, "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "train_seconds": train_seconds, "train_tokens_per_second": tokens_per_second,
        "eval_seconds": stage_records[-1]["eval_seconds"], "inference_latency_ms": latency,
        "peak_memory_mb": peak_rss_mb(), "final_eval_loss": final_eval_loss,
        "history": history, "config": spec.model_dump(mode="json"),
        "versions": _versions(), "git_sha": _git_sha(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if len(prepared) > 1:
        record["stages"] = stage_records
        record["stage_matrix"] = {"stages": [s.name for s in stages],
                                  "scores": [[None if m is None else m.get("score") for m in row] for row in matrix],
                                  "metrics": matrix}
    shutil.rmtree(work, ignore_errors=True)
    return record


def _stage_objective(prepared_stage, tokenizer):
    """An objective (with its collator) for a stage that has not trained yet (``cross_stages: all``)."""
    stage, _, _, _, _, labels = prepared_stage
    objective = registry.build_objective(stage.objective.name, stage.objective.options)
    objective.collator(tokenizer, labels, max_length=stage.data.max_length, template=stage.data.template)
    return objective


def _train_only(model, adapter_name: str) -> None:
    """A stage's new adapter trains alone: earlier adapters stay active but frozen."""
    from tunelab import tuners

    names = tuners.adapters(model)
    tuners.set_active(model, names)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and f".{adapter_name}" not in name and not name.endswith(adapter_name):
            parameter.requires_grad_(False)


def loraplus_groups(model, learning_rate: float, weight_decay: float) -> list[dict] | None:
    """LoRA+ optimizer groups when the method sets ``loraplus_lr_ratio`` (B at lr x ratio); else None."""
    from tunelab.tuners import loraplus

    ratio = loraplus.configured_ratio(model)
    if ratio is None:
        return None
    return loraplus.loraplus_param_groups(model, learning_rate, ratio, weight_decay=weight_decay)


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
