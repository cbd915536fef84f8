"""The experiment schema: shipped configs validate, typos are errors, overrides and grids expand."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from tunelab.errors import ConfigError
from tunelab.experiments.grid import expand_grid
from tunelab.experiments.spec import load_spec, parse_overrides, validate

SHIPPED = sorted(Path(str(resources.files("tunelab") / "configs")).glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(path.stem == "quickstart" for path in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_validates_and_expands(path):
    spec = load_spec(path)
    cells = expand_grid(spec)
    assert cells, "a config must produce at least one run"
    assert len({cell.run_id for cell in cells}) == len(cells)


def _model_references(node, found):
    """Every ``{model: NAME, seed: S}`` pair in a spec (the cell's model, teachers, peers), recursively."""
    if isinstance(node, dict):
        if isinstance(node.get("model"), str):
            found.append((node["model"], node.get("seed", 0)))
        if isinstance(node.get("model"), dict) and isinstance(node["model"].get("name"), str):
            found.append((node["model"]["name"], node["model"].get("seed", 0)))
        for value in node.values():
            _model_references(value, found)
    elif isinstance(node, list):
        for value in node:
            _model_references(value, found)
    return found


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_use_only_shipped_tiny_weights(path):
    """A tiny preset at another pretraining seed than the shipped one is pretrained on first use (an hour
    for tiny-llama on 2 cores): a shipped config must not ask for one (distillation's online cell once
    asked for a seed-1 tiny-llama peer)."""
    from tunelab.models import tiny

    shipped = {name for name in tiny.PRESETS if (tiny.WEIGHTS_DIR / name / "pretrain.json").is_file()}
    for cell in expand_grid(load_spec(path)):
        for name, seed in _model_references(cell.spec.model_dump(mode="json"), []):
            if name in tiny.PRESETS:
                assert name in shipped and seed == 0, f"{path.stem}: {name} at seed {seed} is not shipped"


def test_unknown_key_names_its_location(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\ntrain:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        load_spec(config)


def test_malformed_yaml_names_the_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\ntrain: [1, 2\n")
    with pytest.raises(ConfigError, match="line"):
        load_spec(config)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_are_yaml_values(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text("name: x\n")
    spec = load_spec(config, ["train.max_steps=7", "method.options={r: 4}", "data.domain=[legal, medical]"])
    assert spec.train.max_steps == 7
    assert spec.method.options == {"r": 4}
    assert spec.data.domain == ["legal", "medical"]
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.max_steps"])


def test_grid_is_the_cartesian_product_with_method_overrides():
    spec = validate({
        "name": "g",
        "train": {"learning_rate": 1e-3},
        "grid": {"methods": [{"name": "full", "train": {"learning_rate": 1e-4}}, {"name": "lora"}],
                 "train_sizes": [10, 20], "seeds": [0, 1, 2], "params": {"train.max_steps": [5, 6]}},
    })
    cells = expand_grid(spec)
    assert len(cells) == 2 * 2 * 3 * 2
    full = [c for c in cells if c.spec.method.name == "full"]
    assert all(c.spec.train.learning_rate == 1e-4 for c in full)
    assert all(c.spec.train.learning_rate == 1e-3 for c in cells if c.spec.method.name == "lora")
    assert {c.spec.train.seed for c in cells} == {0, 1, 2}
    assert {c.spec.data.train_size for c in cells} == {10, 20}
    assert "full-n10-s0-max_steps5" in {c.run_id for c in cells}


def test_bad_values_are_rejected():
    with pytest.raises(ConfigError, match="data.train_size"):
        validate({"name": "x", "data": {"train_size": 0}})
    with pytest.raises(ConfigError, match="name"):
        validate({"name": "../escape"})
    with pytest.raises(ConfigError, match="objective"):
        validate({"name": "x", "objective": "telepathy"})


@pytest.mark.parametrize("path", [p for p in SHIPPED if "tiny-llama" in p.read_text()], ids=lambda p: p.stem)
def test_every_method_of_a_shipped_tiny_llama_config_applies(path, small_model_dir):
    """Each method entry (and stage method) of a shipped config builds on a causal LM of the tiny-llama
    family, as the runner's preflight would: a config that cannot start is a bug we ship (P-Tuning v2
    without modules_to_save once asked a causal LM for a classification head)."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.experiments import registry
    from tunelab.experiments.preflight import apply_method, cell_methods
    from tunelab.experiments.spec import resolve_stages

    # tiny-llama's family at width 128, so that width-dependent options (Compacter's PHM) divide as there
    config = AutoConfig.from_pretrained(small_model_dir)
    config.update({"hidden_size": 128, "intermediate_size": 256, "head_dim": 32})
    base = AutoModelForCausalLM.from_config(config)
    seen = set()
    for cell in expand_grid(load_spec(path)):
        stages = resolve_stages(cell.spec)
        if registry.get_objective(stages[0].objective.name).model_task != "causal_lm":
            continue
        methods = cell_methods(cell.spec, stages)
        key = repr([(m.name, sorted(m.options.items(), key=str), name) for m, name in methods])
        if key in seen:
            continue
        seen.add(key)
        model = copy.deepcopy(base)
        for method, name in methods:
            model = apply_method(model, method, "causal_lm", name)
        assert any(p.requires_grad for p in model.parameters()), f"{path.stem}: {key} trains nothing"
