"""The experiment spec: a YAML file validated by a pydantic schema.

An experiment names a model, a PEFT method, an objective, data, training and evaluation settings, and
optionally a ``grid`` (methods × data sizes × seeds × hyper-parameters). Every section forbids unknown
keys, so a typo is an error with the key's location, not a silently ignored setting.

```yaml
name: quickstart
model: {name: tiny-llama}
method: {name: lora, options: {r: 8, lora_alpha: 16, target_modules: all-linear}}
objective: sft
data: {source: synthetic, tasks: [summarization], domain: medical, train_size: 800}
train: {max_steps: 300, learning_rate: 2.0e-3, batch_size: 16}
eval: {max_new_tokens: 24}
grid:
  methods:
    - {name: full, train: {learning_rate: 3.0e-4}}
    - {name: lora, options: {r: 16}}
  seeds: [0, 1, 2]
```
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab.errors import ConfigError
from tunelab.train import TrainConfig

OBJECTIVES = ("sft", "classification", "token_classification")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    name: str = Field("tiny-llama", description="Preset (tiny-llama, tiny-llama-teacher, minilm), local path or hub id.")
    seed: int = Field(0, description="Pretraining seed of tiny presets.")


class MethodSpec(_Strict):
    name: str = Field("lora", description="A registered method (see `tunelab methods`).")
    options: dict[str, Any] = Field(default_factory=dict, description="Method options, HF PEFT field names.")
    train: dict[str, Any] = Field(default_factory=dict, description="Training overrides for this method only "
                                  "(full fine-tuning usually wants a smaller learning rate than LoRA).")
    label: str | None = Field(None, description="Display name in reports; defaults to the method name.")

    @property
    def display(self) -> str:
        return self.label or self.name


class DataSpec(_Strict):
    source: str = Field("synthetic", description="'synthetic' for the built-in world, a file path, or hf:NAME.")
    tasks: list[str] = Field(default_factory=lambda: ["summarization"], description="Built-in task names.")
    domain: str | list[str] = Field("medical", description="Built-in domain(s), or 'all'.")
    train_size: int = Field(800, gt=0, description="Training examples (per task, per domain for synthetic data).")
    eval_size: int = Field(64, ge=0, description="Validation examples for the periodic eval loss.")
    test_size: int = Field(100, gt=0, description="Held-out test examples (held-out entities for synthetic data).")
    seed: int = Field(0, description="Data seed (synthetic world and sampling).")
    format: str | None = Field(None, description="File format; guessed when omitted.")
    columns: dict[str, str] | None = Field(None, description="Column mapping for plain JSONL/CSV/TSV files.")
    test_source: str | None = Field(None, description="A separate test file (files only); else a split of source.")
    template: str = Field("plain", description="Prompt template: plain, alpaca, chatml, auto.")
    max_length: int = Field(256, gt=8, description="Token budget per example.")


class EvalSpec(_Strict):
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per test prompt.")
    batch_size: int = Field(32, gt=0, description="Generation batch size.")
    latency_batches: int = Field(5, ge=0, description="Forward passes timed for inference latency (0 = skip).")


class GridSpec(_Strict):
    methods: list[MethodSpec] | None = Field(None, description="Methods to compare; default: the `method` section.")
    train_sizes: list[int] | None = Field(None, description="Training-set sizes; default: data.train_size.")
    seeds: list[int] | None = Field(None, description="Seeds (training and data); default: train.seed.")
    params: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values, e.g. "
                                         "{'train.learning_rate': [1e-3, 3e-3]}.")


class ExperimentSpec(_Strict):
    name: str = Field(..., description="Run directory name under output_dir.")
    output_dir: str = Field("runs", description="Parent directory of the run directory.")
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    objective: Literal["sft", "classification", "token_classification"] = "sft"
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    grid: GridSpec = Field(default_factory=GridSpec)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("use letters, digits, '-', '_' and '.' only")
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class Cell(BaseModel):
    """One run of the grid: a fully resolved experiment spec plus its run id."""

    run_id: str
    spec: ExperimentSpec
    method_label: str


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see the schema in docs/experiments.md)"
    return f"{source}: invalid config at '{location}': {message}"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.max_steps=50", "method.name=full"]`` → ``{"train.max_steps": 50, ...}`` (YAML values)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (for example train.max_steps=50)")
        try:
            parsed[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
    return parsed


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def validate(raw: dict[str, Any], source: str = "config") -> ExperimentSpec:
    """Validate a raw dict into an :class:`ExperimentSpec` (ConfigError with a one-line message)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (name, model, method, ...)")
    try:
        return ExperimentSpec.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read, override and validate an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} malformed YAML ({getattr(error, 'problem', 'syntax error')})") from None
    raw = raw or {}
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(raw, key, value)
    return validate(raw, str(path))


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
    for method, size, seed, combo in itertools.product(methods, sizes, seeds, itertools.product(*param_values)):
        raw = _deep_copy(base)
        raw["method"] = {"name": method.name, "options": method.options}
        raw["train"] = {**raw["train"], **method.train, "seed": seed}
        raw["data"]["train_size"] = size
        raw["data"]["seed"] = seed
        parts = [method.display, f"n{size}", f"s{seed}"]
        for key, value in zip(param_keys, combo, strict=True):
            set_dotted(raw, key, value)
            parts.append(f"{key.split('.')[-1]}{value}")
        run_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))
        cells.append(Cell(run_id=run_id, spec=validate(raw, f"grid cell {run_id}"), method_label=method.display))
    return cells


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _deep_copy(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(value) for value in tree]
    return tree
