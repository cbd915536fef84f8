"""The experiment spec: a YAML file validated by a pydantic schema.

An experiment names a model, a PEFT method, an objective, data, training and evaluation settings,
optionally a ``grid`` (methods × data sizes × seeds × hyper-parameters) and optionally ``stages`` (a
list of stages run one after the other on the same model). Every section forbids unknown keys, and
method and objective options are validated against their own configs when the file is loaded, so a
typo is an error with the key's location, not a silently ignored setting.

```yaml
name: quickstart
model: {name: tiny-llama}
method: {name: lora, options: {r: 8, lora_alpha: 16, target_modules: all-linear}}
objective: sft                     # or {name: sft, options: {...}}
data: {source: synthetic, tasks: [summarization], domain: medical, train_size: 800}
train: {max_steps: 300, learning_rate: 2.0e-3, batch_size: 16}
eval: {max_new_tokens: 24}
grid:
  methods:
    - {name: full, train: {learning_rate: 3.0e-4}}
    - {name: lora, options: {r: 16}}
    - {name: lora, combine: [{name: prefix_tuning, learning_rate: 1.0e-2}]}   # trained jointly: lora+prefix_tuning
  seeds: [0, 1, 2]
stages:                            # optional: each entry overrides data / objective / method / train
  - {name: medical, data: {domain: medical}}
  - {name: legal, data: {domain: legal}}
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from tunelab.errors import ConfigError, TunelabError
from tunelab.experiments.search import SearchSpec
from tunelab.train import TrainConfig

SEED_LIMIT = 2**63  # seeds are 63-bit non-negative integers (torch, numpy and random all accept them)
NAME_LIMIT = 100  # experiment names and method labels become file names; keep them short
LABEL_LIMIT = 64
RUN_ID_LIMIT = 150  # results/<run_id>.json and adapters/<run_id>/ stay below the 255-byte file-name limit
# Fields that do not change what a cell computes: left out of its identity (cell_key).
# search: what `tunelab tune` explores; report: how the report presents results (a price changes no cell)
COSMETIC_FIELDS = {"name", "output_dir", "description", "search", "report"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        # YAML's `true` would otherwise pass as the integer 1 (`train_size: true`); no field here is a bool
        if isinstance(value, bool):
            raise ValueError("expected a number or text, got a boolean (true/false)")
        return value


Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


class ModelSpec(_Strict):
    name: str = Field("tiny-llama", description="Preset (tiny-llama, tiny-llama-teacher, minilm), local path or hub id.")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Pretraining seed of tiny presets.")
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="Keep only these decoder layers of the model, in this order: a smaller "
        "student initialised from a bigger model's layers (DistilBERT; tunelab.distill.student). Default: all.")

    def identity(self) -> dict[str, Any]:
        """The fields that decide which weights load; ``layers`` only when set (older keys stand)."""
        dumped = self.model_dump(mode="json")
        if dumped["layers"] is None:
            del dumped["layers"]
        return dumped


class ObjectiveSpec(_Strict):
    name: str = Field("sft", description="A registered objective (see `tunelab objectives`).")
    options: dict[str, Any] = Field(default_factory=dict, description="The objective's options (its own config).")


def _objective_from_string(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class CombinedMethod(_Strict):
    """A method stacked on an entry's main method (``combine``): applied after it to the same model as an
    adapter of its own, active with it and trained jointly with it."""

    name: str = Field(..., description="A registered method (see `tunelab methods`).")
    options: dict[str, Any] = Field(default_factory=dict, description="Its options, HF PEFT field names.")
    learning_rate: float | None = Field(None, gt=0, description="Its own learning rate: its parameters get an "
                                        "optimizer group at this rate, on the cell's schedule. Default: the "
                                        "cell's train.learning_rate (the main method's).")


class MethodSpec(_Strict):
    name: str = Field("lora", description="A registered method (see `tunelab methods`).")
    options: dict[str, Any] = Field(default_factory=dict, description="Method options, HF PEFT field names.")
    train: dict[str, Any] = Field(default_factory=dict, description="Training overrides for this method only "
                                  "(full fine-tuning usually wants a smaller learning rate than LoRA).")
    label: str | None = Field(None, min_length=1, max_length=LABEL_LIMIT,
                              description="Display name in reports; defaults to the method name.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Grid entries only: dotted keys of the "
                                      "cell spec set for this entry (e.g. {objective: {name: icl}, stages: [...]}), "
                                      "so strategies that differ in objective or stages sit in one grid.")
    combine: list[CombinedMethod] = Field(default_factory=list, description="Methods applied after this one to "
                                          "the same model, each as its own adapter, all active and trained "
                                          "jointly in one optimizer (LoRA + prefix tuning, LoRA + (IA)3, ...).")

    @model_serializer(mode="wrap")
    def _without_empty_combine(self, handler):
        """``combine`` is left out of dumps when unset: single methods keep their cell keys and saved configs."""
        data = handler(self)
        if not self.combine and isinstance(data, dict):
            data.pop("combine", None)
        return data

    @property
    def display(self) -> str:
        """The label, else the method names joined by '+' (``lora+prefix_tuning``)."""
        return self.label or "+".join([self.name, *(part.name for part in self.combine)])

    def cell_entry(self) -> dict[str, Any]:
        """The ``method`` section of a cell built from this entry (label, train and overrides go elsewhere)."""
        entry: dict[str, Any] = {"name": self.name, "options": self.options}
        if self.combine:
            entry["combine"] = [part.model_dump() for part in self.combine]
        return entry

    def adapters(self, adapter_name: str = "default") -> list[tuple[MethodSpec | CombinedMethod, str]]:
        """``(method, adapter name)`` in the order they are applied: this method as ``adapter_name``, then each
        combined one named after it (``prefix_tuning``; ``<stage>_<method>`` for a stage's; ``_2``, ``_3``
        for a method used again)."""
        parts: list[tuple[MethodSpec | CombinedMethod, str]] = [(self, adapter_name)]
        taken = {adapter_name}
        for part in self.combine:
            name = part.name if adapter_name == "default" else f"{adapter_name}_{part.name}"
            base, count = name, 1
            while name in taken:
                count += 1
                name = f"{base}_{count}"
            taken.add(name)
            parts.append((part, name))
        return parts


FILE_DOMAIN = "general"  # the domain of a data file's rows when neither a `domain` column nor data.domain names one


class DataSpec(_Strict):
    source: str = Field("synthetic", description="'synthetic' for the built-in world, a file path, or hf:NAME.")
    tasks: list[str] = Field(default_factory=lambda: ["summarization"], description="Built-in task names.")
    domain: str | list[str] = Field("medical", description="Built-in domain(s), or 'all'. For a file: the domain of "
                                    "rows without a `domain` column (default: general).")
    train_size: int = Field(800, gt=0, description="Training examples (per task, per domain for synthetic data).")
    eval_size: int = Field(64, ge=0, description="Validation examples for the periodic eval loss.")
    test_size: int | None = Field(None, gt=0, description="Held-out test examples (held-out entities for synthetic "
                                  "data). Default: 100 for synthetic data and for a split of a file; all of "
                                  "test_source (set it to score a sample).")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Data seed (synthetic world and sampling).")
    format: str | None = Field(None, description="File format; guessed when omitted.")
    columns: dict[str, str | int] | None = Field(None, description="Column mapping for plain JSONL/CSV/TSV files "
                                                 "(canonical key -> column name, or index for a headerless file).")
    test_source: str | None = Field(None, description="A separate test file (files only); else a split of source.")
    test_columns: dict[str, str | int] | None = Field(None, description="Column mapping of test_source when its "
                                                      "columns are named differently (default: columns).")
    template: str = Field("plain", description="Prompt template: plain, alpaca, chatml, auto.")
    max_length: int = Field(256, gt=8, description="Token budget per example.")

    @model_validator(mode="before")
    @classmethod
    def _file_domain(cls, values: Any) -> Any:
        """A file names no built-in domain: its rows are ``general`` unless ``domain`` is given beside it."""
        if isinstance(values, dict) and "domain" not in values and values.get("source", "synthetic") != "synthetic":
            return {**values, "domain": FILE_DOMAIN}
        return values

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        from tunelab.data.templates import TEMPLATES

        if value not in TEMPLATES:
            raise ValueError(f"unknown template {value!r}; choose one of {', '.join(TEMPLATES)}")
        return value


class GeneralProbeSpec(_Strict):
    """The general-ability (forgetting) probe: held-out general-domain perplexity before and after tuning
    (:mod:`tunelab.eval.probe`)."""

    source: str = Field("synthetic", min_length=1, description="'synthetic': held-out general-domain documents "
                        "of the built-in world (test-split entities, which no training data uses); or a path to "
                        "a .jsonl file (a `text` field per line) or a plain-text file (documents separated by "
                        "blank lines).")
    documents: int = Field(64, gt=0, description="Documents scored (a file's first N).")
    max_length: int = Field(256, gt=8, description="Tokens per document (BOS and EOS included); longer ones are cut.")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="World seed of the synthetic probe (tiny-llama's "
                      "pretraining world is its model.seed, 0 by default).")


class EvalSpec(_Strict):
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per test prompt.")
    cross_stages: Literal["previous", "all"] = Field("previous", description="After each stage, evaluate on the "
                                                     "test data of every earlier stage (previous) or of every stage (all).")
    batch_size: int = Field(32, gt=0, description="Generation batch size.")
    latency_batches: int = Field(5, ge=0, description="Forward passes timed for inference latency (0 = skip).")
    general_probe: GeneralProbeSpec | None = Field(None, description="Off by default. The general-ability "
                                                   "(forgetting) probe: held-out general-domain perplexity of the "
                                                   "untuned base and of each cell after each stage. `{}` or "
                                                   "`synthetic` for the built-in text, a file path for your own.")

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        """As every section's, except ``general_probe``: ``true`` = the synthetic probe, ``false`` = off;
        a string names its source alone (``general_probe: data/general.jsonl``)."""
        if info.field_name == "general_probe":
            if isinstance(value, bool):
                return {} if value else None
            return {"source": value} if isinstance(value, str) else value
        return _Strict._no_booleans(value)


class ReportSpec(_Strict):
    """How the report presents results; cosmetic (not in a cell's key): changing it reruns no cell."""

    price_per_hour: float | None = Field(None, ge=0, description="Price of one device-hour (any currency; the "
                                         "report says 'units'): adds each cell's training cost, train_seconds / "
                                         "3600 x training processes x price, and a quality-vs-cost frontier. "
                                         "Default: no cost.")


class StageSpec(_Strict):
    """One stage: overrides of the experiment's sections; the model carries over from the stage before."""

    name: str | None = Field(None, description="Stage name (default: stage<i>); also the adapter name of a stage method.")
    data: dict[str, Any] = Field(default_factory=dict, description="Overrides of the data section.")
    objective: ObjectiveSpec | None = Field(None, description="This stage's objective (default: the experiment's).")
    method: MethodSpec | None = Field(None, description="A method added for this stage as a new adapter named "
                                      "after the stage; only it (and the methods it combines, as "
                                      "<stage>_<method>) trains. Default: keep training the model as it is.")
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the train section.")

    _objective_string = field_validator("objective", mode="before")(_objective_from_string)


class GridSpec(_Strict):
    methods: list[MethodSpec] | None = Field(None, description="Methods to compare; default: the `method` section.")
    train_sizes: list[int] | None = Field(None, description="Training-set sizes; default: data.train_size.")
    seeds: list[Seed] | None = Field(None, description="Seeds (training and data); default: train.seed.")
    params: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values, e.g. "
                                         "{'train.learning_rate': [1e-3, 3e-3]}.")


class ExperimentSpec(_Strict):
    name: str = Field(..., max_length=NAME_LIMIT, description="Run directory name under output_dir.")
    output_dir: str = Field("runs", description="Parent directory of the run directory.")
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    grid: GridSpec = Field(default_factory=GridSpec)
    stages: list[StageSpec] = Field(default_factory=list, description="Stages run in order on one model.")
    search: SearchSpec | None = Field(None, description="Hyper-parameter search space of `tunelab tune` "
                                      "(see tunelab.experiments.search).")

    _objective_string = field_validator("objective", mode="before")(_objective_from_string)

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
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None
    check_options(spec, source)
    return spec


def check_method(method: MethodSpec | CombinedMethod, where: str, source: str) -> None:
    """Validate a method's name and options against the method registry (one line naming the key), and
    the methods it combines: their options, and that each can share the model with the others."""
    from tunelab.tuners import registry

    if method.name not in registry.methods():
        raise ConfigError(f"{source}: invalid config at '{where}.name': unknown method {method.name!r}; "
                          f"choose one of: {', '.join(registry.methods())}")
    valid = list(registry.get(method.name).config_class.model_fields)
    unknown = sorted(set(method.options) - set(valid))
    if unknown:
        raise ConfigError(f"{source}: invalid config at '{where}.options.{unknown[0]}': unknown option for method "
                          f"{method.name!r}; valid options: {', '.join(valid) or 'none'}")
    try:
        registry.build_config(method.name, method.options)
    except TunelabError as error:
        raise ConfigError(f"{source}: invalid config at '{where}.options': {error}") from None
    combined = getattr(method, "combine", [])  # a combined entry has none of its own
    for index, part in enumerate(combined):
        check_method(part, f"{where}.combine.{index}", source)
        if part.learning_rate is not None and part.learning_rate > MAX_LEARNING_RATE:
            raise ConfigError(f"{source}: invalid config at '{where}.combine.{index}.learning_rate': "
                              f"{part.learning_rate:g} diverges at once; use at most {MAX_LEARNING_RATE:g}")
    names = [method.name, *(part.name for part in combined)]
    exclusive = next((name for name in names if not registry.get(name).keeps_base_weights), None)
    if combined and exclusive:
        raise ConfigError(f"{source}: invalid config at '{where}.combine': {' + '.join(names)} cannot train together: "
                          f"{exclusive!r} trains every base weight, which the other methods' adapters are built on; "
                          "compare it alone")


def check_options(spec: ExperimentSpec, source: str) -> None:
    """Method and objective options of every section, grid entry and stage, checked at load time."""
    from tunelab.experiments import registry

    def objective(obj: ObjectiveSpec, where: str) -> str:
        try:
            registry.objective_config(obj.name, obj.options, where=f"{where}.options")
        except ConfigError as error:
            message = str(error)
            if message.startswith("unknown objective"):
                message = f"invalid config at '{where}.name': {message}"
            raise ConfigError(f"{source}: {message}") from None
        return registry.get_objective(obj.name).model_task

    check_method(spec.method, "method", source)
    _check_train(spec.train, "train", source)
    for index, method in enumerate(spec.grid.methods or []):
        check_method(method, f"grid.methods.{index}", source)
    tasks = {objective(spec.objective, "objective")}
    names = set()
    for index, stage in enumerate(spec.stages):
        where = f"stages.{index}"
        if stage.method is not None:
            check_method(stage.method, f"{where}.method", source)
        if stage.objective is not None:
            tasks.add(objective(stage.objective, f"{where}.objective"))
        name = stage.name or f"stage{index}"
        if name in names:
            raise ConfigError(f"{source}: invalid config at '{where}.name': two stages are named {name!r}; "
                              "give each stage a distinct name")
        names.add(name)
        _validate_section(DataSpec, {**spec.data.model_dump(), **stage.data}, f"{where}.data", source)
        train = _validate_section(TrainConfig, {**spec.train.model_dump(), **stage.train}, f"{where}.train", source)
        _check_train(train, f"{where}.train", source)
    if len(tasks) > 1:
        raise ConfigError(f"{source}: the stages' objectives need different model heads ({', '.join(sorted(tasks))}); "
                          "stages share one model, so use objectives of one model task")


MAX_LEARNING_RATE = 1.0  # AdamW steps of size ~lr: above 1 every weight is thrown far off in one step


def _check_train(train: TrainConfig, where: str, source: str) -> None:
    """Training values that validate as numbers but cannot train (found here, not after the first step)."""
    if train.learning_rate > MAX_LEARNING_RATE:
        raise ConfigError(f"{source}: invalid config at '{where}.learning_rate': {train.learning_rate:g} diverges "
                          f"at once; use at most {MAX_LEARNING_RATE:g} (adapters ~1e-4..1e-2, full ~1e-5..1e-4)")


def _validate_section(model: type[BaseModel], raw: dict[str, Any], where: str, source: str) -> BaseModel:
    try:
        return model.model_validate(raw)
    except (ValidationError, ConfigError) as error:
        if isinstance(error, ConfigError):
            raise ConfigError(f"{source}: invalid config at '{where}': {error}") from None
        first = error.errors()[0]
        location = ".".join([where, *(str(part) for part in first["loc"])])
        message = "unknown key (check the spelling)" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"{source}: invalid config at '{location}': {message}") from None


@dataclass
class Stage:
    """A stage with every section resolved (data, objective, train) and the method it adds, if any."""

    name: str
    data: DataSpec
    objective: ObjectiveSpec
    train: TrainConfig
    method: MethodSpec | None


def resolve_stages(spec: ExperimentSpec) -> list[Stage]:
    """The stages of a (cell) spec; an experiment without ``stages`` is one stage named ``main``."""
    if not spec.stages:
        return [Stage("main", spec.data, spec.objective, spec.train, None)]
    stages = []
    for index, stage in enumerate(spec.stages):
        base = spec.data.model_dump()
        if stage.data.get("source", base["source"]) != base["source"] and "domain" not in stage.data:
            del base["domain"]  # a stage's own data source has its own domain (default: general for a file)
        data = DataSpec.model_validate({**base, **stage.data})
        train = TrainConfig.model_validate({**spec.train.model_dump(), **stage.train})
        stages.append(Stage(stage.name or f"stage{index}", data, stage.objective or spec.objective, train, stage.method))
    return stages


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader for which a key given twice in one mapping is an error, not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one "
                                  "section; keep one")
            try:
                seen.add(key)
            except TypeError:
                pass  # an unhashable key: SafeLoader reports it below
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file strictly: UTF-8 text, no duplicate keys (ConfigError with one line otherwise)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); save the file as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} malformed YAML ({getattr(error, 'problem', 'syntax error')})") from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read, override and validate an experiment YAML file (the grid is expanded to check its run ids)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = read_yaml(path)
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (name, model, method, ...)")
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(raw, key, value)
    spec = validate(raw, str(path))
    from tunelab.experiments.grid import expand_grid

    expand_grid(spec)  # label clashes and over-long run ids fail at load time
    return spec
