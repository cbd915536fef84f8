"""Run an experiment: every grid cell trains, evaluates and writes ``results/<run>.json``.

The runner knows no objective by name: each stage's objective comes from the registry
(:mod:`tunelab.experiments.registry`), builds its collator, trains through :func:`tunelab.train.train`
and evaluates itself.

Order of work, chosen so that a mistake never leaves a half-written run directory:

1. validate the whole spec and expand the grid (pure, nothing written);
2. preflight (:mod:`tunelab.experiments.preflight`): build the data splits, load the model once and
   apply every method of the grid to a copy
   (unknown options, target modules that match nothing, bad data rows all fail here);
3. only then create ``runs/<name>/``; each cell trains in a scratch folder ``.work/<run>/`` and its
   result file is written atomically when it is complete; finished cells are skipped on a rerun;
4. the report is rebuilt from the result files and failure records (:mod:`tunelab.experiments.report`).

By default each cell runs in a fresh Python subprocess, so that its peak memory (max RSS) is its own;
``jobs`` > 1 runs several at once (:mod:`tunelab.experiments.jobs`). A cell that fails does not stop the
others: it leaves ``failed/<run>.json``, the report lists it, and the run ends with exit code 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import traceback
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import yaml

from tunelab.adapt.store import store
from tunelab.errors import ConfigError, TunelabError
from tunelab.experiments import distributed, efficiency, environment, pricing, registry, rundir
from tunelab.experiments import jobs as parallel
from tunelab.experiments.grid import cell_key, expand_grid
from tunelab.experiments.preflight import apply_methods, load_model, preflight, stage_splits
from tunelab.experiments.rundir import RunLock, check_writable
from tunelab.experiments.spec import Cell, ExperimentSpec, resolve_stages
from tunelab.train.param_groups import combined_rates, optimizer_groups
from tunelab.utils import atomic_path, atomic_write_json, atomic_write_text, seed_everything


def run_experiment(spec: ExperimentSpec, progress: bool = True, isolate: bool = True,
                   console=None, resume: bool = False, jobs: int = 1) -> list[dict]:
    """Run every cell of ``spec`` (skipping finished ones, resuming unfinished ones) and rebuild the report.

    ``resume=True`` insists on an existing run directory (a typo in the name fails instead of starting
    afresh); otherwise a rerun resumes just the same. ``jobs`` > 1 runs up to that many cells at once, each
    in its own subprocess (:mod:`tunelab.experiments.jobs`). A cell that fails is recorded in
    ``failed/<run>.json`` and the others go on; once the report is written, ``jobs.CellsFailed`` (exit
    code 1) names the failed cells, and a rerun retries them.
    """
    from tunelab.experiments.report import write_report

    cells = expand_grid(spec)
    run_dir = spec.run_dir
    check_writable(run_dir)
    parallel.check(jobs, isolate, distributed.world_size())
    if resume and not (run_dir / "results").is_dir():
        raise ConfigError(f"nothing to resume: {run_dir} holds no run; drop --resume to start it")
    main = distributed.is_main()  # under torchrun / accelerate launch: all ranks train, rank 0 writes
    isolate, console = isolate and distributed.world_size() == 1, console if main else None
    lock = RunLock(run_dir) if main else distributed.NoLock()
    if run_dir.is_dir():
        lock.acquire()  # fail at once if another run works here
    try:
        keys = {cell.run_id: cell_key(cell) for cell in cells}
        pending = [c for c in cells if rundir.result_key(_result_path(run_dir, c)) != keys[c.run_id]]
        stale = [p for p in sorted((run_dir / "results").glob("*.json"))
                 if p.stem not in keys or rundir.result_key(p) != keys[p.stem]]
        if pending:
            notes: list[str] = []
            preflight(pending, progress=progress, notes=notes)
            for note in dict.fromkeys(notes):
                _say(console, f"note: {note}")
        if (pending or stale) and main:
            lock.acquire()
            (run_dir / "results").mkdir(parents=True, exist_ok=True)
            for path in stale:
                _say(console, f"{path.stem}: its config changed or left the grid; old result moved to "
                              f"{rundir.supersede(path).relative_to(run_dir)}")
            rundir.drop_stale_failures(run_dir, keys)
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        distributed.barrier()  # the other ranks start a cell once rank 0 has set the run directory up
        todo, failures = [], {}
        for index, cell in enumerate(cells, start=1):
            if cell in pending:
                todo.append((index, cell))
            else:
                _say(console, f"[{index}/{len(cells)}] {cell.run_id}: done already, skipped")

        def start(index: int, cell: Cell) -> None:
            resumed = (run_dir / ".work" / cell.run_id / "key").is_file()
            _say(console, f"[{index}/{len(cells)}] {cell.run_id}: {'resuming' if resumed else 'training'} "
                          f"{cell.spec.method.display}")

        if jobs > 1 and len(todo) > 1:
            env = parallel.thread_env(min(jobs, len(todo)))
            _say(console, f"running up to {min(jobs, len(todo))} cells at once, {env['OMP_NUM_THREADS']} thread(s) each")

            def work(item, popen):
                start(*item)
                return parallel.run_cell_process(item[1], run_dir, keys[item[1].run_id], env, popen)

            parallel.run(todo, jobs, work, lambda item, outcome: _finish(
                console, run_dir, item[1], outcome, f"[{item[0]}/{len(cells)}] {item[1].run_id}: ", failures))
        else:
            for index, cell in todo:
                start(index, cell)
                outcome = _run_one(cell, run_dir, keys[cell.run_id], isolate, progress, main)
                if main:
                    _finish(console, run_dir, cell, outcome, "    ", failures)
        if not main:
            return []
        if (run_dir / "results").is_dir():
            report_section = spec.report.model_dump(mode="json")
            pricing.sync_config(run_dir, report_section)  # a new price reruns no cell but reprices the report
            write_report(run_dir)
        results = [json.loads(_result_path(run_dir, c).read_text()) for c in cells if c.run_id not in failures]
        if failures:
            raise parallel.CellsFailed(parallel.failed_message(failures, len(cells), run_dir), results)
        return results
    finally:
        lock.release()


def _result_path(run_dir: Path, cell: Cell) -> Path:
    return run_dir / "results" / f"{cell.run_id}.json"


_SAY_LOCK = threading.Lock()  # with --jobs, worker threads announce the cells they start


def _say(console, text: str) -> None:
    if console is not None:
        with _SAY_LOCK:
            console.print(text, markup=False, highlight=False, soft_wrap=True)


def _run_one(cell: Cell, run_dir: Path, key: str, isolate: bool, progress: bool, main: bool):
    """Run one cell: None when it finished, else ``(failure record, log)`` (as ``jobs.run_cell_process``)."""
    if isolate:
        return parallel.run_cell_process(cell, run_dir, key)
    try:
        record = run_cell(cell, run_dir, progress=progress and main, key=key)
    except Exception as error:
        if distributed.world_size() > 1:
            raise  # the other ranks wait for this one: the launch stops (torchrun ends every process)
        return parallel.failure(cell, key, type(error).__name__, str(error)), traceback.format_exc()
    if main:
        atomic_write_json(_result_path(run_dir, cell), record)
        shutil.rmtree(run_dir / ".work" / cell.run_id, ignore_errors=True)
    return None


def _finish(console, run_dir: Path, cell: Cell, outcome, prefix: str, failures: dict) -> None:
    """Record and print how a cell ended: its score and flags, or its failure (``failed/<run>.json``)."""
    if outcome is not None:
        record = rundir.write_failure(run_dir, cell.run_id, *outcome)
        failures[cell.run_id] = record
        log = f" (log: {record['log']})" if record.get("log") else ""
        _say(console, f"{prefix}failed: {record['error_type']}: {record['message']}{log}")
        return
    rundir.clear_failure(run_dir, cell.run_id)
    result = json.loads(_result_path(run_dir, cell).read_text())
    _say(console, f"{prefix}score {result['metrics'].get('score', float('nan')):.4f}, "
                  f"{result['trainable_parameters']:,} trainable parameters, {result['train_seconds']:.0f} s")
    for flag in result.get("flags", []):
        _say(console, f"{prefix}warning: {flag}")


def run_cell(cell: Cell, run_dir: Path, progress: bool = True, key: str | None = None,
             callbacks: list | None = None) -> dict:
    """Train and evaluate one cell, stage after stage; returns its result record (the caller writes it).

    Every stage trains the model as the previous stage left it (a stage's ``method`` adds a new adapter
    first), then the model is evaluated on the stage's test data and on every earlier stage's (all
    stages' with ``eval.cross_stages: all``): ``stage_matrix.scores[i][j]`` is the score after stage
    ``i`` on the test data of stage ``j``.

    Resumable: the scratch folder ``.work/<run>/`` (kept until the caller has written the result)
    holds each stage's training checkpoints (with ``train.save_every``) and, after each stage, the
    model's trainable state, the objective's state and the stage's results. A rerun with the same
    cell key continues where the killed run stopped, with the same result as an uninterrupted run.
    The trained adapter goes to ``adapters/<run>/`` and the test predictions to ``predictions/<run>.jsonl``.
    With ``eval.general_probe``, the untuned model's and then, after each stage, the model's perplexity
    on held-out general-domain text are measured (:class:`_GeneralProbe`, :mod:`tunelab.eval.probe`).
    ``callbacks`` are handed to every stage's training loop (``tunelab tune`` reports the eval curve to
    Optuna through one and prunes by raising from it).
    """
    from tunelab.experiments import baselines
    from tunelab.train import train
    from tunelab.train.profile import peak_rss_mb

    spec = cell.spec
    key = key or cell_key(cell)
    seed_everything(spec.train.seed)
    stages = resolve_stages(spec)
    work = run_dir / ".work" / cell.run_id
    main = distributed.is_main()  # under DDP every rank trains; rank 0 alone evaluates and writes
    if main and (work / "key").is_file() and (work / "key").read_text() != key:
        shutil.rmtree(work)  # scratch state of another config: start over
    if main:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / "key", key)
    distributed.barrier()
    prepared = []
    for stage in stages:
        entry, (train_records, eval_records, test_records, labels) = stage_splits(stage)
        prepared.append((stage, entry, train_records, eval_records, test_records, labels))
    model_task = prepared[0][1].model_task
    model, tokenizer = load_model(spec, model_task, prepared[0][5], progress=progress)
    untuned = _untuned(run_dir, spec, stages, prepared, model, tokenizer, progress) if main else None
    probe = _GeneralProbe(run_dir, spec, model_task, model, tokenizer) if main else None  # its "before"
    seed_everything(spec.train.seed)  # the method initialises as if the untuned evaluation had not run
    model = apply_methods(model, spec.method, model_task)
    rates = combined_rates(spec.method, "default")
    objectives, stage_records, history, matrix, predictions = [], [], [], [], []
    train_seconds, tokens_per_second, final_eval_loss = 0.0, 0.0, None
    trained_names: set[str] = set()
    kill_at = int(os.environ.get("TUNELAB_KILL_AT_STEP", "0"))  # fault injection for the resume tests
    memory_device = _memory_device()
    for index, (stage, _, train_records, eval_records, _, labels) in enumerate(prepared):
        if stage.method is not None:
            model = apply_methods(model, stage.method, model_task, adapter_name=stage.name)
            _train_only(model, [name for _, name in stage.method.adapters(stage.name)])
            rates = combined_rates(stage.method, stage.name)
        objective = registry.build_objective(stage.objective.name, stage.objective.options)
        objective.collator(tokenizer, labels, max_length=stage.data.max_length, template=stage.data.template)
        objectives.append(objective)
        trained_names |= {name for name, p in model.named_parameters() if p.requires_grad}
        done = _load_stage(work, index, model, objective)
        if done is not None:
            stage_record, row, stage_history, stage_predictions = done
        else:
            stage_dir = work / ("train" if len(prepared) == 1 else f"train-{index}")
            seed_everything(stage.train.seed)
            with efficiency.MemorySampler(memory_device) as train_memory:
                result = train(model, train_records, objective, stage.train, eval_records=eval_records or None,
                               output_dir=stage_dir, progress=progress, resume=True,
                               callbacks=[*(callbacks or []), *([_killer(kill_at)] if kill_at else [])] or None,
                               param_groups=optimizer_groups(model, rates, stage.train.learning_rate,
                                                             stage.train.weight_decay))
            stage_trainable = _trainable(model, objective)  # before on_stage_end may take the stage's adapter off
            objective.on_stage_end(model, train_records)
            # what the objective's setup made trainable (multitask's per-task adapters) is the stage's too
            trained_names |= {name for name, p in model.named_parameters() if p.requires_grad}
            stage_history = [{**event, "stage": stage.name} for event in result.history] if len(prepared) > 1 \
                else result.history
            started = time.perf_counter()
            with efficiency.MemorySampler(memory_device) as inference_memory:
                row, stage_predictions = _evaluate_row(spec, prepared, objectives, index, model, tokenizer,
                                                       progress) if main else ([None] * len(prepared), [])
            probed = probe.after(model) if probe is not None else {}
            stage_record = {"name": stage.name, "objective": stage.objective.name,
                            "method": stage.method.name if stage.method else None,
                            "train_size": len(train_records), "steps": result.steps,
                            "trainable_parameters": stage_trainable,
                            "train_seconds": result.train_seconds, "tokens_per_second": result.tokens_per_second,
                            "final_eval_loss": result.final_eval_loss,
                            "eval_seconds": time.perf_counter() - started, "metrics": row[index],
                            "train_memory_mb": train_memory.summary(),
                            "inference_memory_mb": inference_memory.summary(), **probed}
            if main:
                _save_stage(work, index, model, objective, trained_names,
                            (stage_record, row, stage_history, stage_predictions))
        history += stage_history
        train_seconds += stage_record["train_seconds"]
        tokens_per_second, final_eval_loss = stage_record["tokens_per_second"], stage_record["final_eval_loss"]
        matrix.append(row)
        stage_records.append(stage_record)
        predictions = stage_predictions
    if not main:
        return None
    metrics = dict(matrix[-1][len(prepared) - 1])
    trainable = stage_records[-1].get("trainable_parameters")  # older stage records lack it
    if trainable is None:
        trainable = _trainable(model, objectives[-1])
    total = sum(p.numel() for p in model.parameters())
    timed = partial(_latency_ms, model, objectives[-1].collate_fn, prepared[-1][4], spec.eval.latency_batches)
    with efficiency.MemorySampler(memory_device) as latency_memory:
        latency, latency_tokens = timed()
        # after every score is taken: merging and unmerging may leave float-level differences in the base
        merged = efficiency.merged_latency_ms(model, lambda: timed()[0]) if latency is not None else None
    last_stage = prepared[-1]
    untuned_last = untuned[-1] if untuned else None
    general = probe.record(stage_records) if probe is not None else None
    if general is not None and "ppl_after" in general:  # the probe's before belongs to the untuned row
        metrics.update(general_ppl=general["ppl_after"], general_ppl_change=general["change"])
        untuned_last = {**(untuned_last or {}), "general_ppl": general["ppl_before"]}
    record = {
        "run_id": cell.run_id, "cell_key": key, "experiment": spec.name, "method": spec.method.name,
        "method_label": cell.method_label, "objective": spec.objective.name, "model": spec.model.name,
        "train_size": len(prepared[0][2]), "seed": spec.train.seed,
        "data_sizes": {"train": len(prepared[0][2]), "train_requested": spec.data.train_size,
                       "validation": len(prepared[0][3]), "test": len(last_stage[4])},
        "metrics": metrics,
        "baselines": {"untuned": untuned_last,
                      "majority_class": baselines.majority_class(last_stage[2], last_stage[4],
                                                                 last_stage[1].objective_class.label_key)},
        "flags": baselines.flags(metrics, untuned_last, predictions),
        "sample_predictions": baselines.samples(predictions),
        "trainable_parameters": trainable, "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "train_seconds": train_seconds, "train_tokens_per_second": tokens_per_second,
        "eval_seconds": stage_records[-1]["eval_seconds"], "inference_latency_ms": latency,
        "inference_latency_tokens": latency_tokens, "device": environment.device_info(model),
        "peak_memory_mb": peak_rss_mb(), "final_eval_loss": final_eval_loss,
        "history": history, "config": spec.model_dump(mode="json"),
        "versions": environment.versions(), "git_sha": environment.git_sha(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if general is not None:
        record["general_probe"] = general
    if spec.method.combine:
        record["combined_methods"] = [part.name for part in spec.method.combine]
        record["trainable_parameters_by_adapter"] = {
            name: sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and name in n.split("."))
            for _, name in spec.method.adapters()}
    record["outputs"] = _save_outputs(run_dir, cell.run_id, model, predictions, objectives)
    record["efficiency"] = {
        "train_memory_mb": efficiency.combine(s.get("train_memory_mb") for s in stage_records),
        "inference_memory_mb": efficiency.combine([*(s.get("inference_memory_mb") for s in stage_records),
                                                   latency_memory.summary()]),
        "memory_source": "cuda_reserved" if memory_device is not None else "rss",
        "latency_ms_unmerged": latency, "latency_ms_merged": merged,
        "adapter_mb": efficiency.adapter_mb(run_dir / record["outputs"]["adapter"])
        if record["outputs"].get("adapter") else None}
    if len(prepared) > 1:
        record["stages"] = stage_records
        record["stage_matrix"] = {"stages": [s.name for s in stages],
                                  "scores": [[None if m is None else m.get("score") for m in row] for row in matrix],
                                  "metrics": matrix}
        if untuned:
            record["stage_matrix"]["untuned"] = [m.get("score") for m in untuned]
    return record


def _killer(step: int):
    """A training callback that SIGKILLs this process once ``step`` is logged (tests of resume)."""
    def callback(event: dict) -> None:
        if event.get("step") == step and "loss" in event:
            os.kill(os.getpid(), signal.SIGKILL)
    return callback


def _evaluate_row(spec, prepared, objectives, index, model, tokenizer, progress):
    """Scores after stage ``index`` on each stage's test data; the predictions on this stage's own."""
    from tunelab.eval import tasks

    row, own = [], []
    for other, (_, _, _, _, other_test, _) in enumerate(prepared):
        if other > index and spec.eval.cross_stages == "previous":
            row.append(None)
            continue
        evaluator = objectives[other] if other < len(objectives) else _stage_objective(prepared[other], tokenizer)
        with tasks.recording() as predictions:
            row.append(evaluator.evaluate(model, other_test, max_new_tokens=spec.eval.max_new_tokens,
                                          batch_size=spec.eval.batch_size, progress=progress))
        if other == index:
            own = predictions
    return row, own


def _untuned(run_dir, spec, stages, prepared, model, tokenizer, progress) -> list[dict] | None:
    """The untrained model's metrics on every stage's test data (cached per model and data in the run dir)."""
    from tunelab.experiments import baselines

    key = baselines.untuned_key(spec, stages)
    cached = baselines.cached_untuned(run_dir, key)
    if cached is not None:
        return cached
    scores = []
    for stage_prepared in prepared:
        objective = _stage_objective(stage_prepared, tokenizer)
        scores.append(objective.evaluate(model, stage_prepared[4], max_new_tokens=spec.eval.max_new_tokens,
                                         batch_size=spec.eval.batch_size, progress=progress))
    baselines.store_untuned(run_dir, key, scores)
    return scores


class _GeneralProbe:
    """The general-ability probe of one cell (:mod:`tunelab.eval.probe`): the untuned base's perplexity on
    the probe text (cached per model and probe in ``baselines/``), then the model's after each stage."""

    def __init__(self, run_dir: Path, spec: ExperimentSpec, model_task: str, model, tokenizer) -> None:
        from tunelab.eval import probe
        from tunelab.experiments import baselines

        self.spec, self.tokenizer = spec.eval.general_probe, tokenizer
        self.skipped = probe.skip_reason(model_task) if self.spec is not None else None
        self.before = None
        if self.spec is None or self.skipped:
            return
        self.batch_size = spec.eval.batch_size
        texts = probe.load_texts(self.spec.source, self.spec.documents, self.spec.seed)
        self.sequences = probe.encode(tokenizer, texts, self.spec.max_length)
        key = baselines.general_probe_key(spec)
        self.before = baselines.cached_general_probe(run_dir, key)
        if self.before is None:
            self.before = probe.measure(model, tokenizer, self.sequences, self.batch_size)
            baselines.store_general_probe(run_dir, key, self.before)

    def after(self, model) -> dict:
        """``{"general_ppl", "general_ppl_change", "general_probe_adapters"}`` of the model as it serves
        general-domain text: with the adapters it has active, or, where per-domain adapters mapped the
        ``general`` domain to one (``store(model)["domain_adapters"]``), with that adapter alone."""
        from tunelab import tuners
        from tunelab.eval import probe

        if self.before is None:
            return {}
        serving = store(model).get("domain_adapters", {}).get("general")
        previous = tuners.active_adapters(model)
        if serving is not None:
            tuners.set_active(model, [serving])
        try:
            ppl = probe.measure(model, self.tokenizer, self.sequences, self.batch_size)["perplexity"]
            adapters = tuners.active_adapters(model)
        finally:
            if serving is not None and previous:
                tuners.set_active(model, previous)
        return {"general_ppl": ppl, "general_ppl_change": probe.change(ppl, self.before["perplexity"]),
                "general_probe_adapters": adapters}

    def record(self, stage_records: list[dict]) -> dict | None:
        """The result's ``general_probe`` block: before, after (the last stage), change, per stage."""
        if self.spec is None:
            return None
        if self.skipped:
            return {"skipped": self.skipped}
        last = stage_records[-1]
        return {"source": self.spec.source, "documents": len(self.sequences), "tokens": self.before["tokens"],
                "max_length": self.spec.max_length, "ppl_before": self.before["perplexity"],
                "ppl_after": last.get("general_ppl"), "change": last.get("general_ppl_change"),
                "adapters": last.get("general_probe_adapters"),
                "stages": [{"name": s["name"], "ppl": s.get("general_ppl"), "change": s.get("general_ppl_change")}
                           for s in stage_records]}


def _save_stage(work: Path, index: int, model, objective, names: set[str], results: tuple) -> None:
    """After a stage: the trainable state of every stage so far, the objective's state and outputs, the
    model's cross-stage store (what later stages' objectives read: EWC's Fisher, the replay buffer, ...),
    the random state (a later stage's new adapter initialises as in an uninterrupted run) and the results
    (written last: their file marks the stage finished)."""
    from tunelab.train.checkpoint import capture_rng_state

    objective.save_outputs(model, work / f"stage-{index}-outputs")
    state = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if name in names}
    with atomic_path(work / f"stage-{index}.pt") as tmp:
        torch.save({"model": state, "objective": objective.state_dict(), "store": dict(store(model)),
                    "rng": capture_rng_state()}, tmp)
    stage_record, row, history, predictions = results
    atomic_write_json(work / f"stage-{index}.json", {"record": stage_record, "row": row, "history": history,
                                                      "predictions": predictions})


def _load_stage(work: Path, index: int, model, objective):
    """Restore a finished stage saved by :func:`_save_stage`; None when it did not finish."""
    from tunelab.train.checkpoint import restore_rng_state

    results, weights = work / f"stage-{index}.json", work / f"stage-{index}.pt"
    if not (results.is_file() and weights.is_file()):
        return None
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    objective.load_outputs(model, work / f"stage-{index}-outputs")  # first: it may add the modules restored below
    parameters = dict(model.named_parameters())
    missing = sorted(set(saved["model"]) - set(parameters))
    if missing:
        raise TunelabError(f"{weights} holds {missing[0]!r}, which the model lacks; delete {work} to run the cell "
                           "from the start")
    with torch.no_grad():
        for name, value in saved["model"].items():
            parameters[name].copy_(value.to(parameters[name].device))
    objective.load_state_dict(saved["objective"])
    cross_stage = store(model)  # as the finished stage left it, for the stages after it
    cross_stage.clear()
    cross_stage.update(saved.get("store", {}))
    if "rng" in saved:
        restore_rng_state(saved["rng"])
    done = json.loads(results.read_text())
    return done["record"], done["row"], done["history"], done["predictions"]


def _save_outputs(run_dir: Path, run_id: str, model, predictions: list[dict], objectives=()) -> dict:
    """The trained adapter (tunelab format, and PEFT format where the method has one), what the stages'
    objectives keep beside it (``save_outputs``: multi-task heads) and the predictions."""
    from tunelab import tuners

    adapter_dir = run_dir / "adapters" / run_id
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    outputs: dict[str, str | None] = {"adapter": None, "peft_adapter": None}
    try:
        tuners.save(model, adapter_dir)
        outputs["adapter"] = str(adapter_dir.relative_to(run_dir))
        tuners.save(model, adapter_dir / "peft", format="peft")
        outputs["peft_adapter"] = str((adapter_dir / "peft").relative_to(run_dir))
    except TunelabError:
        pass  # a method (or combination) without that format: keep what was written
    for objective in objectives:  # in stage order: a later stage's outputs replace an earlier one's
        for name, path in objective.save_outputs(model, adapter_dir).items():
            outputs[name] = str(Path(path).relative_to(run_dir))
    lines = "".join(json.dumps(row, default=str) + "\n" for row in predictions)
    atomic_write_text(run_dir / "predictions" / f"{run_id}.jsonl", lines)
    outputs["predictions"] = f"predictions/{run_id}.jsonl"
    return outputs


def _trainable(model, objective) -> int:
    """Parameters the stage trains: the model's trainable ones and those of the objective's own modules
    (a reward or task head), each counted once."""
    trained = {id(p): p for module in (model, *objective.modules()) for p in module.parameters() if p.requires_grad}
    return sum(p.numel() for p in trained.values())


def _stage_objective(prepared_stage, tokenizer):
    """An objective (with its collator) for a stage that has not trained yet (``cross_stages: all``)."""
    stage, _, _, _, _, labels = prepared_stage
    objective = registry.build_objective(stage.objective.name, stage.objective.options)
    objective.collator(tokenizer, labels, max_length=stage.data.max_length, template=stage.data.template)
    return objective


def _train_only(model, adapter_names: list[str]) -> None:
    """A stage's new adapters (its method and the methods it combines) train alone: earlier adapters stay
    active but frozen."""
    from tunelab import tuners

    if isinstance(adapter_names, str):  # one name, not its letters
        raise TypeError("_train_only takes a list of adapter names")
    names = tuners.adapters(model)
    tuners.set_active(model, names)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not any(f".{own}" in name or name.endswith(own) for own in adapter_names):
            parameter.requires_grad_(False)


@torch.no_grad()
def _latency_ms(model, collate, records: list[dict], batches: int) -> tuple[float | None, int | None]:
    """Median wall time of one forward pass over a batch of 8 test examples, in milliseconds, and the
    batch's non-padding tokens (what an inference cost per token divides by); ``(None, None)`` when skipped."""
    from tunelab.train.profile import count_tokens

    if batches <= 0 or not records:
        return None, None
    batch = collate(records[:8])
    device = next(model.parameters()).device  # training leaves the model on the accelerator's device
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    model.eval()
    model(**inputs)  # warm-up
    times = []
    for _ in range(batches):
        _synchronize(device)
        started = time.perf_counter()
        model(**inputs)
        _synchronize(device)  # CUDA runs asynchronously: time the work, not its launch
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2], count_tokens(inputs) or None


def _memory_device() -> torch.device | None:
    """Where training runs memory-wise: the CUDA device when there is one (the loop trains there), else
    None (the sampler reads this process's RSS)."""
    return torch.device("cuda") if torch.cuda.is_available() else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
