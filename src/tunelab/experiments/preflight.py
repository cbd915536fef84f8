"""Everything a cell needs before it trains, and the preflight that checks it all before a run writes.

- :func:`load_model` loads the spec's model with the head its objective's model task needs (a broken
  model directory is a one-line :class:`~tunelab.errors.ModelError`);
- :func:`apply_method` applies a PEFT method and keeps a task head tunelab added trainable;
  :func:`apply_methods` applies a method with the methods it combines (``method.combine``);
- :func:`stage_splits` builds (and caches) a stage's data splits;
- :func:`preflight` fails fast, before anything is written: output directory, data, model, every
  method's options and targets, prompt lengths against the model's positions, one collated batch
  of training and test records per stage, and the general probe's text (``eval.general_probe``).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from tunelab.errors import ConfigError, DataError, ModelError, TunelabError
from tunelab.experiments import registry
from tunelab.experiments.data import build_splits
from tunelab.experiments.rundir import check_writable
from tunelab.experiments.spec import Cell, CombinedMethod, ExperimentSpec, MethodSpec, Stage, resolve_stages

HEAD_NAMES = ("score", "classifier")  # heads that transformers adds for classification tasks


def load_model(spec: ExperimentSpec, model_task: str, labels: list[str] | None, progress: bool = True):
    """``(model, tokenizer)`` of the spec's model with the head its objective's model task needs."""
    from tunelab.models import zoo

    try:
        model, tokenizer = zoo.load(spec.model.name, task=model_task, seed=spec.model.seed, label_names=labels,
                                    progress=progress)
    except TunelabError:
        raise
    except Exception as error:  # an empty, truncated or corrupt model directory: the user's to fix
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"cannot load model {spec.model.name!r}: {type(error).__name__}: {reason} "
                         "(check the model directory or hub id)") from None
    if spec.model.layers is not None:
        from tunelab.distill.student import init_from_teacher

        model = init_from_teacher(model, layers=spec.model.layers)
    return model, tokenizer


def apply_method(model, method: MethodSpec | CombinedMethod, model_task: str, adapter_name: str = "default"):
    """Apply one method (not the ones it combines: :func:`apply_methods`); a task head added by tunelab
    (``classifier``/``score``) always trains.

    Methods that support PEFT's ``modules_to_save`` get the head there (so it is saved with the
    adapter); for the others, the head's parameters are simply unfrozen. A combined method leaves the
    head to the main method's adapter (one trained copy of it, not one per adapter).
    """
    from tunelab import tuners
    from tunelab.tuners import registry

    options = dict(method.options)
    heads = []
    fields = registry.get(method.name).config_class.model_fields
    if model_task != "causal_lm" and method.name != "full":
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        heads = [name for name in HEAD_NAMES if name in leaf_names]
        if heads and "modules_to_save" in fields and not options.get("modules_to_save") and adapter_name == "default":
            options["modules_to_save"] = heads
            heads = []
    if isinstance(method, CombinedMethod) and "modules_to_save" in fields and "modules_to_save" not in options:
        options["modules_to_save"] = None  # tuners.apply would otherwise give this adapter a head copy too
    kwargs = {} if adapter_name == "default" else {"adapter_name": adapter_name}
    model = tuners.apply(model, method.name, **options, **kwargs)
    for name, parameter in model.named_parameters():
        if any(part in heads for part in name.split(".")):
            parameter.requires_grad_(True)
    return model


def stage_splits(stage: Stage, cache: dict | None = None, notes: list[str] | None = None):
    """``(objective entry, (train, validation, test, labels))`` of a stage, cached by data + objective."""
    entry = registry.get_objective(stage.objective.name)
    key = f"{entry.objective_class.label_key}/{stage.data.model_dump_json()}"
    if cache is not None and key in cache:
        return entry, cache[key]
    splits = build_splits(stage.data, entry.objective_class.label_key, notes)
    if cache is not None:
        cache[key] = splits
    return entry, splits


def apply_methods(model, method: MethodSpec, model_task: str, adapter_name: str = "default"):
    """Apply ``method`` as ``adapter_name`` and each method it combines as its own adapter
    (``MethodSpec.adapters``); all of them join the active adapters and train. A combined method the
    model refuses (QLoRA's 4-bit layers under another method, DoRA around one, ...) is a one-line
    ConfigError naming the combination."""
    from tunelab import tuners

    active = tuners.active_adapters(model)
    parts = method.adapters(adapter_name)
    for index, (part, name) in enumerate(parts):
        try:
            model = apply_method(model, part, model_task, name)
        except TunelabError as error:
            if index == 0:
                raise
            raise ConfigError(f"method {method.display!r}: {part.name} cannot be combined with "
                              f"{' + '.join(p.name for p, _ in parts[:index])} on this model: {error}") from None
    tuners.set_active(model, [*active, *(name for _, name in parts)])
    return model


PROMPT_OPTIONS = ("num_virtual_tokens",)  # options that add positions to every sequence


def method_entries(spec: ExperimentSpec, stages: list[Stage]) -> list[tuple[MethodSpec, str]]:
    """``(method entry, adapter name)`` of a cell: the experiment's method as ``default``, then each stage's
    own method under the stage's name (an entry may combine further methods: :func:`cell_methods`)."""
    return [(spec.method, "default")] + [(s.method, s.name) for s in stages if s.method is not None]


def cell_methods(spec: ExperimentSpec, stages: list[Stage]) -> list[tuple[MethodSpec | CombinedMethod, str]]:
    """``(method, adapter name)`` of every adapter a cell applies, in order: each entry of
    :func:`method_entries` followed by the methods it combines (``MethodSpec.adapters``)."""
    return [part for method, name in method_entries(spec, stages) for part in method.adapters(name)]


def preflight(cells: list[Cell], progress: bool = True, notes: list[str] | None = None) -> None:
    """Fail fast, before anything is written: output directory, data, model, every method's options and
    targets, and one collated batch of training and test records per stage."""
    split_cache: dict[str, Any] = {}
    base_cache: dict[str, Any] = {}
    seen_methods: set[str] = set()
    seen_collate: set[str] = set()
    probe_cache: set[str] = set()
    notes = notes if notes is not None else []
    for cell in cells:
        spec = cell.spec
        check_writable(spec.run_dir)
        stages = resolve_stages(spec)
        labels = None
        for index, stage in enumerate(stages):
            entry, splits = stage_splits(stage, split_cache, notes)
            if index == 0:
                labels = splits[3]
            elif splits[3] != labels and entry.model_task != "causal_lm":
                raise ConfigError(f"stage {stage.name!r} has other labels ({splits[3]}) than the first stage "
                                  f"({labels}); stages share one classification head")
        model_task = registry.get_objective(stages[0].objective.name).model_task
        model_key = f"{spec.model.name}/{spec.model.seed}/{spec.model.layers}/{model_task}/{labels}"
        if model_key not in base_cache:
            base_cache[model_key] = load_model(spec, model_task, labels, progress=progress)
        base, tokenizer = base_cache[model_key]
        for stage in stages:
            collate_key = f"{model_key}/{stage.objective.model_dump_json()}/{stage.data.model_dump_json()}"
            if collate_key not in seen_collate:
                seen_collate.add(collate_key)
                _check_collate(stage, split_cache, tokenizer, labels)
        probe_length = _check_general_probe(spec, model_task, base, probe_cache)
        methods = cell_methods(spec, stages)
        method_key = f"{model_key}/" + json.dumps([(m.name, m.options, a) for m, a in methods], sort_keys=True, default=str)
        method_key += f"/{probe_length}"
        if method_key not in seen_methods:
            _check_prompt_length(base, methods, max([s.data.max_length for s in stages] + [probe_length]))
            model = copy.deepcopy(base)
            for method, adapter_name in method_entries(spec, stages):
                model = apply_methods(model, method, model_task, adapter_name)
            seen_methods.add(method_key)


def _check_collate(stage: Stage, split_cache: dict, tokenizer, labels) -> None:
    """The stage's objective can collate its training and test records (wrong record kinds fail here)."""
    _, (train_records, _, test_records, _) = stage_splits(stage, split_cache)
    objective = registry.build_objective(stage.objective.name, stage.objective.options)
    collate = objective.collator(tokenizer, labels, max_length=stage.data.max_length, template=stage.data.template)
    for name, records in (("training", train_records), ("test", test_records)):
        try:
            collate(list(records[:2]))
        except TunelabError as error:
            raise DataError(f"stage {stage.name!r}: objective {stage.objective.name!r} cannot use the {name} "
                            f"records: {error}") from None
        except (KeyError, TypeError, ValueError) as error:
            kinds = sorted({str(r.get("kind", "?")) for r in records})
            raise DataError(f"stage {stage.name!r}: objective {stage.objective.name!r} cannot use {name} records of "
                            f"kind {', '.join(kinds)} ({type(error).__name__}: {error}); choose an objective for "
                            "this data or map its columns") from None


def _check_general_probe(spec: ExperimentSpec, model_task: str, model, checked: set[str]) -> int:
    """The general probe's text loads (a missing or empty file fails here) and fits the model's positions;
    returns its token budget (0 when it is off or skipped for an encoder)."""
    from tunelab.eval import probe
    from tunelab.eval.generate import position_limit

    settings = spec.eval.general_probe
    if settings is None or probe.skip_reason(model_task):
        return 0
    key = settings.model_dump_json()
    if key not in checked:
        probe.load_texts(settings.source, settings.documents, settings.seed)
        checked.add(key)
    limit = position_limit(model)
    if limit is not None and settings.max_length > limit:
        raise ConfigError(f"eval.general_probe.max_length={settings.max_length} exceeds the model's {limit} "
                          f"positions; use at most {limit}")
    return settings.max_length


def _check_prompt_length(model, methods, max_length: int) -> None:
    """Virtual tokens (prompt/prefix tuning) plus the longest sequence must fit the model's positions;
    the virtual tokens of every method of a cell add up (they are all active at once)."""
    from tunelab.eval.generate import position_limit

    limit = position_limit(model)
    counted = [(method.name, option, method.options[option]) for method, _ in methods for option in PROMPT_OPTIONS
               if isinstance(method.options.get(option), int)]
    total = sum(value for _, _, value in counted)
    if not counted or limit is None or total + max_length <= limit:
        return
    if len(counted) == 1:
        name, option, value = counted[0]
        raise ConfigError(f"method {name!r}: {option}={value} plus data.max_length={max_length} "
                          f"exceeds the model's {limit} positions; use {option} <= {max(limit - max_length, 1)}")
    raise ConfigError(f"methods {' + '.join(name for name, _, _ in counted)}: {total} virtual tokens "
                      f"({' + '.join(str(value) for _, _, value in counted)}) plus data.max_length={max_length} "
                      f"exceed the model's {limit} positions; use at most {max(limit - max_length, 1)} in all")
