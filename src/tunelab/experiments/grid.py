"""The grid of an experiment: its cells and their identities.

- :func:`expand_grid` turns a spec into cells (methods × train sizes × seeds × ``grid.params``), each a
  validated spec with a readable run id and a report label; label and run-id clashes fail here.
- :func:`cell_key` hashes everything that determines a cell's result (the resolved spec without cosmetic
  fields, the data files' contents, a local model directory's files): a finished cell whose key changed
  runs again.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.experiments.spec import (
    COSMETIC_FIELDS,
    RUN_ID_LIMIT,
    Cell,
    ExperimentSpec,
    resolve_stages,
    set_dotted,
    validate,
)


def clean_run_id(text: str) -> str:
    """A run id safe as a file name: letters (any script), digits, '.', '-', '_'; other runs become '_'."""
    return re.sub(r"[^\w.-]+", "_", text).strip(".") or "_"


def expand_grid(spec: ExperimentSpec) -> list[Cell]:
    """All cells of the grid, each a validated spec with a readable run id."""
    methods = spec.grid.methods or [spec.method]
    sizes = spec.grid.train_sizes or [spec.data.train_size]
    seeds = spec.grid.seeds or [spec.train.seed]
    param_keys = sorted(spec.grid.params)
    param_values = [spec.grid.params[key] for key in param_keys]
    base = spec.model_dump(exclude={"grid"})
    cells: list[Cell] = []
    labels = [m.display for m in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError("grid.methods: two methods share a label; give each a distinct 'label'")
    cleaned: dict[str, str] = {}
    for label in labels:
        other = cleaned.setdefault(clean_run_id(label), label)
        if other != label:
            raise ConfigError(f"grid.methods: labels {other!r} and {label!r} both become the run id "
                              f"{clean_run_id(label)!r}; give them labels that differ in letters or digits")
    for method, size, seed, combo in itertools.product(methods, sizes, seeds, itertools.product(*param_values)):
        raw = _deep_copy(base)
        raw["method"] = method.cell_entry()
        raw["train"] = {**raw["train"], **method.train, "seed": seed}
        for key, value in method.overrides.items():
            set_dotted(raw, key, _deep_copy(value))
        raw["data"]["train_size"] = size
        raw["data"]["seed"] = seed
        parts = [method.display, f"n{size}", f"s{seed}"]
        settings = []
        for key, value in zip(param_keys, combo, strict=True):
            set_dotted(raw, key, value)
            parts.append(f"{key.split('.')[-1]}{value}")
            settings.append(f"{key.split('.')[-1]}={_short_value(value)}")
        run_id = clean_run_id("-".join(parts))
        # cells that differ in grid.params are different rows of the report, not seeds of one row
        label = f"{method.display} ({', '.join(settings)})" if settings else method.display
        if len(run_id) > RUN_ID_LIMIT:
            raise ConfigError(f"grid: run id {run_id[:40]}... is {len(run_id)} characters (at most {RUN_ID_LIMIT}); "
                              "use shorter labels or grid.params values")
        cells.append(Cell(run_id=run_id, spec=validate(raw, f"grid cell {run_id}"), method_label=label))
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.run_id in seen:
            raise ConfigError(f"grid: two cells get the run id {cell.run_id!r}; make labels or grid.params values "
                              "differ in letters or digits")
        seen[cell.run_id] = cell
    return cells


def _short_value(value: Any) -> str:
    """A grid value as a report label: objectives by name and options, lists joined, None as 'all'."""
    if value is None:
        return "all"
    if isinstance(value, dict):
        options = value.get("options") if isinstance(value.get("options"), dict) else {
            k: v for k, v in value.items() if k != "name"}
        inner = ",".join(f"{k}={v}" for k, v in options.items() if not isinstance(v, (dict, list)))
        text = f"{value.get('name', '')}({inner})" if inner else str(value.get("name", value))
    elif isinstance(value, (list, tuple)):
        text = "+".join(_short_value(v) for v in value)
    else:
        text = str(value)
    return text if len(text) <= 72 else text[:69] + "..."


def cell_key(cell: Cell) -> str:
    """The identity of a cell: a hash of everything that determines its result.

    The resolved spec without its cosmetic fields (``COSMETIC_FIELDS``: ``name``, ``output_dir``,
    ``description``, ``search``, ``report``) and without ``eval.general_probe`` when it is off (so adding
    that option left older keys as they were), plus a fingerprint (SHA-256 of the content) of every data
    file it reads (the probe's file too), plus — when the model is a local directory — each of its files'
    name, size and modification time (hashing gigabytes of weights on every run would cost more than it
    saves). A finished cell whose key differs from the current one
    is stale: it is run again.
    """
    import hashlib
    import json

    spec = cell.spec.model_dump(mode="json", exclude=COSMETIC_FIELDS)
    spec["model"] = cell.spec.model.identity()  # model.layers unset: the keys of cells from before it stand
    if spec["eval"].get("general_probe") is None:
        del spec["eval"]["general_probe"]  # off (the default): the keys of cells from before the probe stand
    files = {}
    for stage in resolve_stages(cell.spec):
        for source in (stage.data.source, stage.data.test_source):
            if source and source != "synthetic" and not source.startswith("hf:"):
                files[source] = file_fingerprint(Path(source))
    probe = cell.spec.eval.general_probe
    if probe is not None and probe.source != "synthetic":
        files[probe.source] = file_fingerprint(Path(probe.source))
    model_dir = Path(cell.spec.model.name)
    if model_dir.is_dir():
        files["model"] = sorted((str(f.relative_to(model_dir)), f.stat().st_size, f.stat().st_mtime_ns)
                                for f in model_dir.rglob("*") if f.is_file())
    payload = json.dumps({"spec": spec, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> str | None:
    """SHA-256 of a file's bytes (None when it is missing: preflight reports that)."""
    import hashlib

    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _deep_copy(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(value) for value in tree]
    return tree
