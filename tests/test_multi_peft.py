"""Combinations of PEFT methods on one model, trained jointly (``method.combine``, configs/multi_peft.yaml).

- tuners: two different methods on one model (stacked on the same Linear where their targets meet) --
  all parameters train and change, ``trainable_parameters`` counts both, save/load gives identical
  logits, merge where both merge, the composition LoRA + (IA)³ computes is the one written down;
- spec and preflight: ``combine`` in a method or grid entry, its label and adapter names, unchanged cell
  keys without it, one-line errors for combinations that cannot work;
- a two-cell ``tunelab run`` (one method alone, one combination) whose trainable count is the parts' sum.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tunelab import tuners
from tunelab.errors import ConfigError, MethodError
from tunelab.experiments.grid import cell_key, expand_grid
from tunelab.experiments.spec import MethodSpec, validate
from tunelab.models import testing
from tunelab.train.engine import build_param_groups
from tunelab.train.param_groups import combined_rates, optimizer_groups

LORA = ("lora", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
IA3 = ("ia3", {})  # tiny-llama's default: k_proj, v_proj (output), down_proj (input): inside LoRA's layers
PREFIX = ("prefix_tuning", {"num_virtual_tokens": 4, "prefix_projection": True})
PROMPT = ("prompt_tuning", {"num_virtual_tokens": 4})
BOTTLENECK = ("bottleneck", {"placement": "houlsby", "reduction_factor": 8})  # wraps o_proj and down_proj

#             id, the methods in the order they are applied, whether all of them merge
COMBINATIONS = [
    ("lora+prefix_tuning", [LORA, PREFIX], False),
    ("lora+ia3", [LORA, IA3], True),
    ("ia3+lora", [IA3, LORA], True),  # the other way round: LoRA's layer wraps (IA)³'s
    ("bottleneck+prompt_tuning", [BOTTLENECK, PROMPT], False),
    ("lora+bottleneck", [LORA, BOTTLENECK], False),
    ("prompt_tuning+prefix_tuning", [PROMPT, PREFIX], False),  # both add virtual tokens: they add up
]
IDS = [case[0] for case in COMBINATIONS]


def combine(model: nn.Module, methods: list[tuple[str, dict]]) -> list[str]:
    """Apply ``methods`` in order (the first as ``default``, the others named after them), all active."""
    names = []
    for index, (method, options) in enumerate(methods):
        name = "default" if index == 0 else method
        tuners.apply(model, method, adapter_name=name, **options)
        names.append(name)
    tuners.set_active(model, names)
    return names


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    return {key: p for key, p in tuners.trainable_parameters(model) if name in key.split(".")}


def train_steps(model: nn.Module, batch: dict, steps: int = 3, rates: dict | None = None) -> torch.optim.Optimizer:
    """AdamW over the runner's optimizer groups (a combined method's own rate included)."""
    groups = build_param_groups(model, 0.0, optimizer_groups(model, rates or {}, 1e-2, 0.0))
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    for _ in range(steps):  # B = 0 and an adapter's up = 0 at init: their partners move from step 2
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize(("label", "methods", "mergeable"), COMBINATIONS, ids=IDS)
def test_every_part_trains_jointly_and_counts(label, methods, mergeable):
    model = testing.tiny_llama()
    names = combine(model, methods)
    trainable = dict(tuners.trainable_parameters(model))
    alone = []
    for method, options in methods:
        single = tuners.apply(testing.tiny_llama(), method, **options)
        alone.append(sum(p.numel() for _, p in tuners.trainable_parameters(single)))
    assert sum(p.numel() for p in trainable.values()) == sum(alone)  # the sum of the parts
    parts = {name: adapter_parameters(model, name) for name in names}
    assert all(parts.values()) and sum(map(len, parts.values())) == len(trainable)  # each adapter's own, no other
    before = {key: p.detach().clone() for key, p in trainable.items()}
    optimizer = train_steps(model, testing.example_batch(model), rates={names[1]: 3e-2})
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trainable.values()}
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert {rates[id(p)] for p in parts[names[1]].values()} == {3e-2}  # the combined method's own rate
    assert {rates[id(p)] for p in parts["default"].values()} == {1e-2}  # the main method's: the cell's
    unchanged = [key for key, p in trainable.items() if torch.equal(p.detach(), before[key])]
    assert not unchanged, f"{label}: {unchanged[:3]} did not change"


def trained_combination(methods):
    """A tiny Llama with ``methods`` combined, trained a few steps, in eval mode: (model, batch, its logits)."""
    model = testing.tiny_llama()
    combine(model, methods)
    batch = testing.example_batch(model)
    train_steps(model, batch)
    model.eval()
    with torch.no_grad():
        return model, batch, model(**batch).logits


@pytest.mark.parametrize(("label", "methods", "mergeable"), COMBINATIONS, ids=IDS)
def test_save_load_round_trip_gives_identical_logits(label, methods, mergeable, tmp_path):
    model, batch, expected = trained_combination(methods)
    tuners.save(model, tmp_path / "adapter")
    loaded = tuners.load(testing.tiny_llama(), tmp_path / "adapter").eval()
    assert tuners.active_adapters(loaded) == tuners.active_adapters(model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    with pytest.raises(MethodError, match="different HF PEFT types|no HF PEFT format") as error:
        tuners.save(model, tmp_path / "peft", format="peft")  # one PEFT model holds one method
    assert "\n" not in str(error.value) and not (tmp_path / "peft").exists()
    with tuners.disabled(model), torch.no_grad():
        assert torch.allclose(model(**batch).logits, testing.tiny_llama().eval()(**batch).logits, atol=1e-6)


@pytest.mark.parametrize(("label", "methods"), [(label, methods) for label, methods, mergeable in COMBINATIONS
                                                if mergeable], ids=[i for i, _, m in COMBINATIONS if m])
def test_a_stack_of_mergeable_methods_merges_from_the_inside_out(label, methods):
    model, batch, expected = trained_combination(methods)
    with torch.no_grad():
        tuners.merge(model)
        assert torch.allclose(model(**batch).logits, expected, atol=1e-5)
        tuners.unmerge(model)
        assert torch.allclose(model(**batch).logits, expected, atol=1e-5)
        with pytest.raises(MethodError, match="runs inside merged"):
            tuners.merge(model, [methods[1][0]])  # the outer layer alone would fold over an unmerged inner one
        plain = tuners.unload(copy.deepcopy(model), merge=True)
        assert not list(tuners.tuner_layers(plain)) and torch.allclose(plain(**batch).logits, expected, atol=1e-5)
        base = tuners.unload(model, merge=False)
        assert torch.allclose(base(**batch).logits, testing.tiny_llama().eval()(**batch).logits, atol=1e-6)


def test_an_adapter_stacked_over_lora_merges_nothing_but_lets_lora_merge():
    model = testing.tiny_llama()
    combine(model, [LORA, BOTTLENECK])
    batch = testing.example_batch(model)
    train_steps(model, batch)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        with pytest.raises(MethodError, match="cannot be merged"):
            tuners.merge(model)
        tuners.merge(model, ["default"])  # the inner LoRA: the adapter outside sees the same output
        assert torch.allclose(model(**batch).logits, expected, atol=1e-5)
        tuners.unmerge(model)
        tuners.delete_adapter(model, "default")  # the adapter's layer takes LoRA's place around the Linear
        assert {type(layer).__name__ for _, layer in tuners.tuner_layers(model)} == {"AdapterLayer"}


def test_lora_inside_ia3_computes_the_written_composition():
    """One Linear, x (B, in): h = l ⊙ (W x + b + s B A x) when (IA)³ scales the output; with
    ``feedforward_modules`` it scales the input of both, h = W (l ⊙ x) + b + s B A (l ⊙ x); applied the
    other way round, (IA)³ inside LoRA: h = l ⊙ (W x + b) + s B A x."""
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    lora = {"r": 2, "lora_alpha": 4, "target_modules": ["0"], "init_lora_weights": False}

    def build(order, feedforward):
        model = nn.Sequential(nn.Linear(6, 5))
        linear = model[0]
        ia3 = {"target_modules": ["0"], "feedforward_modules": ["0"] if feedforward else [], "init_ia3_weights": False}
        combine(model, [("lora", lora), ("ia3", ia3)] if order == "lora+ia3" else [("ia3", ia3), ("lora", lora)])
        layers = {type(layer).__name__: layer for _, layer in tuners.tuner_layers(model)}
        lora_layer, ia3_layer = layers["LoraLayer"], layers["IA3Layer"]
        A, B = (next(iter(weights.values())).weight for weights in (lora_layer.lora_A, lora_layer.lora_B))
        scale = next(iter(ia3_layer.ia3_l.values())).flatten()  # (out,) or, feed-forward, (in,)
        return model, linear.weight, linear.bias, A, B, 4 / 2, scale  # s = lora_alpha / r

    with torch.no_grad():
        model, W, b, A, B, s, scale = build("lora+ia3", feedforward=False)
        assert torch.allclose(model(x), scale * (x @ W.T + b + s * x @ A.T @ B.T), atol=1e-6)
        model, W, b, A, B, s, scale = build("lora+ia3", feedforward=True)
        scaled = x * scale
        assert torch.allclose(model(x), scaled @ W.T + b + s * scaled @ A.T @ B.T, atol=1e-6)
        model, W, b, A, B, s, scale = build("ia3+lora", feedforward=False)
        assert torch.allclose(model(x), scale * (x @ W.T + b) + s * x @ A.T @ B.T, atol=1e-6)


def test_methods_that_cannot_stack_refuse_in_one_line():
    qlora = tuners.apply(testing.tiny_llama(), "qlora", r=2, target_modules=["k_proj", "v_proj", "down_proj"])
    with pytest.raises(MethodError, match="already wrapped by QLoraLayer") as error:
        tuners.apply(qlora, "ia3", adapter_name="ia3")  # would rescale the 4-bit codes when merged
    assert "\n" not in str(error.value) and list(tuners.adapters(qlora)) == ["default"]
    ia3 = tuners.apply(testing.tiny_llama(), "ia3")
    with pytest.raises(MethodError, match="LoRA variant"):
        tuners.apply(ia3, "dora", adapter_name="dora", r=2)  # DoRA's norm reads the bare base weight
    assert {type(layer).__name__ for _, layer in tuners.tuner_layers(ia3)} == {"IA3Layer"}  # untouched


# ------------------------------------------------------------------------------------ spec and preflight


def spec(tmp_path, model, method: dict, **extra) -> dict:
    return {"name": "mix", "output_dir": str(tmp_path / "runs"), "model": {"name": str(model)}, "method": method,
            "data": {"tasks": ["summarization"], "train_size": 8, "eval_size": 0, "test_size": 2},
            "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
            "eval": {"max_new_tokens": 2, "latency_batches": 0}, **extra}


def test_combine_gives_labels_adapter_names_and_rates(tmp_path):
    lora = {"name": "lora", "options": {"r": 2}}
    raw = spec(tmp_path, "tiny-llama", lora, grid={"methods": [
        lora, {**lora, "combine": [{"name": "prefix_tuning", "options": {"num_virtual_tokens": 4},
                                    "learning_rate": 1e-2}]}]})
    cells = expand_grid(validate(raw))
    assert [c.method_label for c in cells] == ["lora", "lora+prefix_tuning"]
    assert [c.run_id for c in cells] == ["lora-n8-s0", "lora_prefix_tuning-n8-s0"]
    combined = cells[1].spec.method
    assert [(m.name, name) for m, name in combined.adapters()] == [("lora", "default"), ("prefix_tuning", "prefix_tuning")]
    assert combined_rates(combined, "default") == {"prefix_tuning": 1e-2}
    again = MethodSpec(name="lora", combine=[{"name": "lora"}, {"name": "lora"}])
    assert [name for _, name in again.adapters()] == ["default", "lora", "lora_2"]
    assert [name for _, name in again.adapters("legal")] == ["legal", "legal_lora", "legal_lora_2"]
    # unset, the field is in no dump: keys of single methods are those of before it existed
    assert "combine" not in cells[0].spec.model_dump()["method"]
    assert cell_key(cells[0]) == cell_key(expand_grid(validate({**raw, "grid": {"methods": [
        {**lora, "combine": []}]}}))[0])
    assert cell_key(cells[1]) != cell_key(cells[0])


def test_combinations_that_cannot_work_fail_at_load_in_one_line(tmp_path):
    cases = [({"name": "lora", "combine": [{"name": "full"}]}, "'full' trains every base weight"),
             ({"name": "full", "combine": [{"name": "ia3"}]}, r"full \+ ia3 cannot train together"),
             ({"name": "lora", "combine": [{"name": "ia3", "options": {"r": 4}}]}, "method.combine.0.options.r"),
             ({"name": "lora", "combine": [{"name": "ia3", "learning_rate": 3.0}]}, "diverges")]
    for method, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            validate(spec(tmp_path, "tiny-llama", method))
        assert "\n" not in str(error.value)


def test_preflight_refuses_a_combination_the_model_cannot_hold_before_writing(tmp_path, small_model_dir):
    from tunelab.experiments.preflight import preflight

    dora_over_ia3 = {"name": "ia3", "combine": [{"name": "dora", "options": {"r": 2}}]}
    with pytest.raises(ConfigError, match="dora cannot be combined with ia3.*LoRA variant") as error:
        preflight(expand_grid(validate(spec(tmp_path, small_model_dir, dora_over_ia3))), progress=False)
    assert "\n" not in str(error.value)
    # 200 virtual tokens fit the 512 positions beside 256 tokens of data; 400 do not
    tokens = {"name": "prompt_tuning", "options": {"num_virtual_tokens": 200},
              "combine": [{"name": "prefix_tuning", "options": {"num_virtual_tokens": 200}}]}
    with pytest.raises(ConfigError, match="prompt_tuning \\+ prefix_tuning: 400 virtual tokens"):
        preflight(expand_grid(validate(spec(tmp_path, small_model_dir, tokens))), progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_run_with_a_method_alone_and_combined(tmp_path, small_model_dir):
    """Two cells in process: LoRA alone and LoRA + prefix tuning (its own rate); the combination trains
    LoRA's parameters plus the prefix's, saves both in tunelab's format, and its history logs LoRA's rate."""
    import json

    import yaml

    from tunelab.cli import main

    lora = {"name": "lora", "options": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}
    prefix = {"name": "prefix_tuning", "options": {"num_virtual_tokens": 4}, "learning_rate": 1e-2}
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump(spec(tmp_path, small_model_dir, lora, grid={
        "methods": [lora, {**lora, "combine": [prefix]}]})))
    assert main(["run", str(config), "--in-process"]) == 0
    results = tmp_path / "runs" / "mix" / "results"
    alone = json.loads((results / "lora-n8-s0.json").read_text())
    combined = json.loads((results / "lora_prefix_tuning-n8-s0.json").read_text())
    model_config = json.loads((small_model_dir / "config.json").read_text())
    head_dim = model_config["hidden_size"] // model_config["num_attention_heads"]
    prefix_count = 4 * 2 * model_config["num_hidden_layers"] * model_config["num_key_value_heads"] * head_dim
    assert combined["trainable_parameters"] == alone["trainable_parameters"] + prefix_count
    assert combined["trainable_parameters_by_adapter"] == {"default": alone["trainable_parameters"],
                                                           "prefix_tuning": prefix_count}
    assert combined["method_label"] == "lora+prefix_tuning" and combined["combined_methods"] == ["prefix_tuning"]
    assert combined["outputs"]["adapter"] and combined["outputs"]["peft_adapter"] is None  # no PEFT form
    assert alone["outputs"]["peft_adapter"] is not None
    logged = [event["lr"] for event in combined["history"] if "lr" in event]
    assert logged and 0 < max(logged) <= 1e-3  # the main method's rate (the prefix trains at 1e-2)
    saved = json.loads((tmp_path / "runs" / "mix" / combined["outputs"]["adapter"] / "tunelab_adapter.json").read_text())
    assert saved["active"] == ["default", "prefix_tuning"]


def test_a_stage_combination_trains_its_adapters_alone(tmp_path):
    """A stage's method with ``combine`` adds ``<stage>`` and ``<stage>_<method>``; both train, earlier ones freeze."""
    from tunelab.experiments.preflight import apply_methods, cell_methods
    from tunelab.experiments.runner import _train_only
    from tunelab.experiments.spec import resolve_stages

    stage_method = {"name": "lora", "options": {"r": 2}, "combine": [{"name": "ia3"}]}
    cell = expand_grid(validate(spec(tmp_path, "tiny-llama", {"name": "lora", "options": {"r": 2}},
                                     stages=[{"name": "legal", "method": stage_method}])))[0]
    stages = resolve_stages(cell.spec)
    assert [name for _, name in cell_methods(cell.spec, stages)] == ["default", "legal", "legal_ia3"]
    model = apply_methods(testing.tiny_llama(), cell.spec.method, "causal_lm")
    model = apply_methods(model, stages[0].method, "causal_lm", "legal")
    _train_only(model, ["legal", "legal_ia3"])
    assert tuners.active_adapters(model) == ["default", "legal", "legal_ia3"]
    assert not adapter_parameters(model, "default")
    assert adapter_parameters(model, "legal") and adapter_parameters(model, "legal_ia3")
