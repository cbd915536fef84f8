"""Hyper-parameter search with Optuna: ``tunelab tune CONFIG --trials N``.

The idea: a *fair* comparison gives every method the same tuning budget. Each trial is one cell of the
experiment, run in this process with the values Optuna samples from the spec's ``search:`` section
(:mod:`tunelab.experiments.search`) set on its dotted keys; its held-out metric is the trial's value.

- **Sampler**: TPE (Bergstra et al., 2011), seeded with ``train.seed`` plus the number of trials the
  study already holds, so a single worker is reproducible and a second worker on the same study does
  not replay the first one's random start-up samples.
- **Pruning**: median pruning on the eval curve. Every eval event of the training loop reaches the
  trial through a loop callback (``run_cell(callbacks=...)``) as its eval loss — sign-flipped when the
  study maximizes, so "better" always points the study's way — and a trial whose value at step ``t`` is
  worse than the median of earlier trials at ``t`` stops (``optuna.TrialPruned``). A non-finite eval
  loss (a diverged trial) is pruned at once.
- **Storage**: SQLite in the run folder (``runs/<name>/tune.db``) by default; any RDB URL
  (``--storage postgresql://...``) lets several processes or machines work on one study: each asks
  the storage for its next trial, so no trial runs twice.
- **Default first**: a new study enqueues the spec's own values as trial 0, so the report says how much
  the search gained over the configuration you wrote.
- **Equal budget** (``search.per_method`` or ``--per-method``): one study per method of
  ``grid.methods`` (``<study>.<label>``), N trials each; then ``best.yaml`` is a grid of every method at
  its best configuration (over ``grid.seeds`` and ``grid.train_sizes``), run as a normal experiment.

Outputs in ``runs/<name>/``: ``tune.db``, ``trials/<trial>.json`` (each trial's full result record),
``best.yaml`` (runnable: ``tunelab run runs/<name>/best.yaml``), ``tune_report.md`` and ``tune_report.html``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError
from tunelab.experiments import grid
from tunelab.experiments import spec as spec_module
from tunelab.experiments.rundir import check_writable, file_lock
from tunelab.experiments.search import ParamSpace, SearchSpec
from tunelab.experiments.spec import Cell, ExperimentSpec, MethodSpec
from tunelab.utils import atomic_write_json, atomic_write_text

PRIMITIVES = (str, int, float, type(None))


@dataclass
class Target:
    """What one study tunes: a method entry (from ``method`` or one of ``grid.methods``)."""

    label: str
    method: MethodSpec
    study_name: str


@dataclass
class TuneOutcome:
    run_dir: Path
    studies: dict[str, Any] = field(default_factory=dict)  # label -> optuna.Study
    best_yaml: Path | None = None
    report: Path | None = None
    comparison: list[dict] | None = None


def storage_url(spec: ExperimentSpec, storage: str | None) -> str:
    """``--storage`` as given, or SQLite in the run folder."""
    if storage:
        return storage
    return f"sqlite:///{(spec.run_dir / 'tune.db').resolve()}"


def targets(spec: ExperimentSpec, per_method: bool, study_name: str | None) -> list[Target]:
    base = study_name or spec.name
    if not per_method:
        return [Target(spec.method.display, spec.method, base)]
    if not spec.grid.methods:
        raise ConfigError("equal-budget tuning (--per-method) needs grid.methods: the methods to compare")
    return [Target(m.display, m, f"{base}.{grid.clean_run_id(m.display)}") for m in spec.grid.methods]


def applicable(space: dict[str, ParamSpace], method: MethodSpec) -> dict[str, ParamSpace]:
    """The searched keys that mean something for ``method`` (method.options.X only if the method has X)."""
    from tunelab.tuners import registry

    fields = registry.get(method.name).config_class.model_fields
    return {key: value for key, value in space.items()
            if not key.startswith("method.options.") or key.removeprefix("method.options.") in fields}


def cell_for(spec: ExperimentSpec, target: Target, params: dict[str, Any], run_id: str) -> Cell:
    """The cell of one trial: the spec at its own data size and seed, the target's method, the sampled values."""
    raw = spec.model_dump(mode="json", exclude={"grid", "search"})
    method = target.method
    raw["method"] = {**method.cell_entry(), "options": dict(method.options)}
    raw["train"] = {**raw["train"], **method.train}
    for key, value in method.overrides.items():
        spec_module.set_dotted(raw, key, value)
    for key, value in params.items():
        spec_module.set_dotted(raw, key, value)
    return Cell(run_id=run_id, spec=spec_module.validate(raw, f"trial {run_id}"), method_label=target.label)


def _encode(choice: Any) -> Any:
    return choice if isinstance(choice, PRIMITIVES) else json.dumps(choice)


def sample(trial, space: dict[str, ParamSpace]) -> dict[str, Any]:
    """One value per searched key (lists and mappings among categorical choices travel as JSON text)."""
    values = {}
    for key, dist in space.items():
        if dist.type == "float":
            values[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)
        elif dist.type == "int":
            step = int(dist.step) if dist.step else 1
            values[key] = trial.suggest_int(key, int(dist.low), int(dist.high), log=dist.log, step=step)
        else:
            encoded = trial.suggest_categorical(key, [_encode(c) for c in dist.choices])
            values[key] = next(c for c in dist.choices if _encode(c) == encoded)
    return values


def spec_values(spec: ExperimentSpec, target: Target, space: dict[str, ParamSpace]) -> dict[str, Any]:
    """The values the spec itself gives the searched keys for ``target`` (keys without one are left out)."""
    from tunelab.tuners import registry

    cell_spec = cell_for(spec, target, {}, "default").spec
    raw = cell_spec.model_dump(mode="json")
    # the method's own defaults for options the spec leaves out (r, lora_alpha, ...)
    options = registry.build_config(cell_spec.method.name, cell_spec.method.options)
    raw["method"]["options"] = {**options.model_dump(mode="json"), **raw["method"]["options"]}
    values = {}
    for key in space:
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            values[key] = node
    return values


def defaults(spec: ExperimentSpec, target: Target, space: dict[str, ParamSpace]) -> dict[str, Any]:
    """Trial 0: the spec's own values (factor 1 for a relative key); keys without one are left to the sampler."""
    values = {}
    for key, node in spec_values(spec, target, space).items():
        dist = space[key]
        values[key] = 1.0 if dist.relative else _encode(node) if dist.type == "categorical" else node
    return values


def relative_bases(spec: ExperimentSpec, target: Target, space: dict[str, ParamSpace]) -> dict[str, float]:
    """The value each relative key's factor multiplies: the spec's own value for the target's method."""
    keys = [key for key, dist in space.items() if dist.relative]
    if not keys:
        return {}
    found = spec_values(spec, target, {key: space[key] for key in keys})
    bases = {}
    for key in keys:
        base = found.get(key)
        if not isinstance(base, int | float) or isinstance(base, bool) or base == 0:
            raise ConfigError(f"search.params.{key} is relative, but the spec gives {key} no non-zero number for "
                              f"method {target.label!r} (got {base!r}); set one (e.g. in its grid.methods entry) "
                              "or drop relative: true")
        bases[key] = float(base)
    return bases


def absolute(params: dict[str, Any], bases: dict[str, float]) -> dict[str, Any]:
    """Sampled values with every relative factor turned into the value it stands for (factor × base)."""
    return {key: value * bases[key] if key in bases else value for key, value in params.items()}


def check_space(spec: ExperimentSpec, target: Target, space: dict[str, ParamSpace]) -> dict[str, float]:
    """Every searched key, at its low and high end (and every choice), gives a valid spec: typos fail now.
    Returns the relative keys' bases (:func:`relative_bases`), which the check needs anyway."""
    bases = relative_bases(spec, target, space)
    ends = [{k: (d.choices[0] if d.type == "categorical" else d.low) for k, d in space.items()},
            {k: (d.choices[-1] if d.type == "categorical" else d.high) for k, d in space.items()}]
    for values in ends:
        values = {k: int(v) if space[k].type == "int" else v for k, v in values.items()}
        cell_for(spec, target, absolute(values, bases), "search-check")
    return bases


class EvalReporter:
    """Training callback: each eval event's loss goes to the trial; prune when the pruner says so."""

    def __init__(self, trial, maximize: bool) -> None:
        self.trial, self.sign = trial, -1.0 if maximize else 1.0
        self.offset, self.last_step = 0, 0

    def __call__(self, event: dict) -> bool:
        import optuna

        if "eval_loss" not in event:
            return False
        if event["step"] <= self.last_step - self.offset:  # a new stage restarts its step count
            self.offset = self.last_step
        step = self.offset + event["step"]
        self.last_step = step
        loss = event["eval_loss"]
        if loss is None or not math.isfinite(loss):
            raise optuna.TrialPruned(f"eval loss {loss} at step {step} (diverged)")
        self.trial.report(self.sign * loss, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"eval loss {loss:.4f} at step {step} is worse than the median")
        return False


def metric_value(record: dict, metric: str) -> float:
    if metric == "eval_loss":
        value = record.get("final_eval_loss")
    else:
        value = record["metrics"].get(metric)
    if value is None:
        raise ConfigError(f"search.metric {metric!r} is not in the trial's results; choose one of: eval_loss, "
                          f"{', '.join(sorted(record['metrics']))}")
    return float(value)


def open_storage(url: str):
    """The study's storage, with heartbeats so that a dead worker's trial is failed and retried.

    Every running trial's worker writes a heartbeat every ``TUNELAB_TUNE_HEARTBEAT_S`` seconds (default
    60); the next worker to start a trial marks any trial silent for twice that long FAILED, and
    ``RetryFailedTrialCallback`` enqueues it again once with the same values: killing a worker loses
    at most its running trial. SQLite waits up to 60 s for a lock held by another worker.
    """
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    heartbeat = max(1, int(os.environ.get("TUNELAB_TUNE_HEARTBEAT_S", "60")))
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(10):
        try:
            with warnings.catch_warnings():  # Optuna 5 calls heartbeats experimental and renames the retry
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # callback (4.9); both
                warnings.simplefilter("ignore", FutureWarning)  # still work: keep `tunelab tune`'s output clean
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1))
        except SQLAlchemyError:  # workers creating a new database at once race on its schema: the winner's is used
            if attempt == 9:
                raise
            time.sleep(0.5 + 0.5 * random.random())


def open_study(search: SearchSpec, name: str, storage: str, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=search.pruning.startup_trials,
                                         n_warmup_steps=search.pruning.warmup_steps) \
        if search.pruning.enabled else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=name, storage=open_storage(storage), load_if_exists=True,
                                direction=search.direction, pruner=pruner)
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def run_trials(spec: ExperimentSpec, target: Target, trials: int, storage: str, progress: bool = False,
               console=None):
    """Run ``trials`` trials of ``target``'s study (new or shared with other workers); returns the study."""
    import optuna

    from tunelab.experiments.runner import run_cell

    search = spec.search
    space = applicable(search.params, target.method)
    bases = check_space(spec, target, space)
    run_dir = spec.run_dir
    study = open_study(search, target.study_name, storage, spec.train.seed)
    # Optuna's check-then-enqueue is not atomic (skip_if_exists reads the trials, then inserts): two workers
    # opening a new study at once both enqueued the default. A file lock in the run folder serialises it for
    # the workers of one machine (SQLite's case, and a shared RDB's workers on one host).
    with file_lock(run_dir / ".tune.lock"):
        if not study.trials:
            study.enqueue_trial(defaults(spec, target, space), user_attrs={"default": True}, skip_if_exists=True)

    def objective(trial) -> float:
        params = absolute(sample(trial, space), bases)
        run_id = grid.clean_run_id(f"{target.label}-trial{trial.number:03d}")
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("values", params)  # what the cell ran with (relative factors resolved)
        cell = cell_for(spec, target, params, run_id)
        _say(console, f"{target.study_name} trial {trial.number}: {_short(params)}")
        try:
            record = run_cell(cell, run_dir, progress=progress,
                              callbacks=[EvalReporter(trial, search.direction == "maximize")])
        except optuna.TrialPruned as pruned:
            _say(console, f"    pruned: {pruned}")
            raise
        finally:
            shutil.rmtree(run_dir / ".work" / run_id, ignore_errors=True)
        atomic_write_json(run_dir / "trials" / f"{run_id}.json", record)
        value = metric_value(record, search.metric)
        for key in ("train_seconds", "peak_memory_mb", "trainable_parameters"):
            trial.set_user_attr(key, record.get(key))
        _say(console, f"    {search.metric} {value:.4f} ({record['train_seconds']:.0f} s)")
        return value

    study.optimize(objective, n_trials=trials, gc_after_trial=True)
    return study


def best_method(target: Target, study) -> MethodSpec:
    """The target's method entry with its best trial's values folded in (options, train, other overrides)."""
    best = study.best_trial
    options, train, overrides = dict(target.method.options), dict(target.method.train), dict(target.method.overrides)
    for key, value in best.user_attrs.get("values", best.params).items():
        value = _decode(value)
        if key.startswith("method.options."):
            options[key.removeprefix("method.options.")] = value
        elif key.startswith("train.") and key.count(".") == 1:
            train[key.removeprefix("train.")] = value
        else:
            overrides[key] = value
    return MethodSpec(name=target.method.name, options=options, train=train, label=target.method.label,
                      overrides=overrides, combine=target.method.combine)


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def write_best_yaml(spec: ExperimentSpec, methods: list[MethodSpec], path: Path) -> Path:
    """A runnable spec of the best configuration(s): one method, or a grid of every method's best."""
    raw = spec.model_dump(mode="json", exclude={"search"})
    raw["name"] = f"{spec.name}-best"
    raw["description"] = f"Best configuration(s) found by `tunelab tune` for {spec.name}."
    grid = {k: v for k, v in raw.get("grid", {}).items() if k in ("train_sizes", "seeds") and v}
    entries = [m.model_dump(mode="json", exclude_none=True) for m in methods]
    entries = [{k: v for k, v in e.items() if v not in ({}, [])} for e in entries]
    if len(methods) == 1 and not methods[0].overrides:
        raw["method"] = {"name": methods[0].name, "options": methods[0].options}
        raw["train"] = {**raw["train"], **methods[0].train}
    else:
        grid["methods"] = entries
    raw["grid"] = grid
    text = f"# Written by `tunelab tune` from {spec.name}; run it with `tunelab run {path}`.\n"
    text += yaml.safe_dump(raw, sort_keys=False)
    atomic_write_text(path, text)
    spec_module.load_spec(path)  # what we write must load
    return path


def tune(spec: ExperimentSpec, trials: int, storage: str | None = None, study_name: str | None = None,
         per_method: bool | None = None, compare: bool = True, isolate: bool = True, progress: bool = False,
         console=None) -> TuneOutcome:
    """Run the search (every target's study), write best.yaml and the tune report; with equal budget and
    ``compare``, run the comparison of every method's best configuration."""
    from tunelab.experiments import tune_report

    if spec.search is None:
        raise ConfigError(f"{spec.name}: no search: section; add search.params (see docs/tune.md)")
    if trials < 1:
        raise ConfigError("--trials must be at least 1")
    per_method = spec.search.per_method if per_method is None else per_method
    check_writable(spec.run_dir)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url(spec, storage)
    outcome = TuneOutcome(run_dir=spec.run_dir)
    _check_keys_apply(spec)
    from tunelab.experiments.preflight import preflight

    # every target's own configuration must build (data, model, method options) before any trial runs:
    # a user mistake is then one line, not a failed trial with Optuna's traceback
    preflight([cell_for(spec, t, {}, "preflight") for t in targets(spec, per_method, study_name)], progress=progress)
    for target in targets(spec, per_method, study_name):
        outcome.studies[target.label] = run_trials(spec, target, trials, url, progress, console)
    finished = {label: study for label, study in outcome.studies.items() if _has_complete(study)}
    if finished:
        best = [best_method(t, finished[t.label]) for t in targets(spec, per_method, study_name) if t.label in finished]
        outcome.best_yaml = write_best_yaml(spec, best, spec.run_dir / "best.yaml")
    if per_method and compare and outcome.best_yaml is not None:
        running = sum(_running(study) for study in outcome.studies.values())
        if running:  # another worker on the same storage is still tuning: comparing now would freeze best
            # configurations its trials may still beat; the worker that finishes last compares
            _say(console, f"{running} trial(s) still running in other workers on this storage: no comparison "
                          f"from this one (the last worker to finish runs it, or: tunelab run {outcome.best_yaml})")
        else:
            from tunelab.experiments.runner import run_experiment

            best_spec = spec_module.load_spec(outcome.best_yaml)
            best_spec = best_spec.model_copy(update={"output_dir": spec.output_dir})
            outcome.comparison = run_experiment(best_spec, progress=progress, isolate=isolate, console=console)
    outcome.report = tune_report.write(spec, outcome.studies, outcome.comparison)
    return outcome


def _check_keys_apply(spec: ExperimentSpec) -> None:
    """A method option that no method of the spec (method, grid.methods) has is a typo, not a skipped key."""
    from tunelab.tuners import registry

    search, methods = spec.search, [spec.method, *(spec.grid.methods or [])]
    for key in search.params:
        if key.startswith("method.options.") and not any(key in applicable(search.params, m) for m in methods):
            names = sorted({m.name for m in methods})
            valid = sorted({f for m in methods for f in registry.get(m.name).config_class.model_fields})
            raise ConfigError(f"search.params.{key}: no tuned method ({', '.join(names)}) has option "
                              f"{key.removeprefix('method.options.')!r}; valid options: {', '.join(valid)}")


def _running(study) -> int:
    """Trials of ``study`` that some worker is running now (read fresh from the storage)."""
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def _has_complete(study) -> bool:
    import optuna

    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def _short(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in params.items())


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
