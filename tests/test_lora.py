"""LoRA checks the matrix cannot make: the equation by hand, rsLoRA, Conv1D, target matching, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing
from tunelab.tuners.lora import LoraLayer
from tunelab.tuners.modules_to_save import ModulesToSaveLayer


@torch.no_grad()
def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _, layer in tuners.tuner_layers(model):
        for module in layer.lora_B.values():
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.3)


def wrapped_paths(model: nn.Module) -> list[str]:
    return [path for path, layer in tuners.tuner_layers(model) if isinstance(layer, LoraLayer)]


# ------------------------------------------------------------------------------------------- the math


def test_lora_equation_by_hand() -> None:
    model = tuners.apply(testing.toy_mlp(), "lora", r=4, lora_alpha=12, target_modules=["up"])
    layer = model.blocks[0].up
    in_features = layer.in_features
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    assert A.shape == (4, in_features) and B.shape == (layer.out_features, 4)
    assert torch.all(B == 0) and A.abs().max() <= 1 / math.sqrt(in_features)  # kaiming-uniform(a=sqrt 5) bound
    randomize_lora(model)
    x = torch.randn(5, in_features)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ W.T + b + (12 / 4) * (x @ A.T) @ B.T  # h = W x + (alpha / r) B A x
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_rslora_scales_by_alpha_over_sqrt_r() -> None:
    plain = tuners.apply(testing.toy_mlp(), "lora", r=16, lora_alpha=8, target_modules=["up"])
    stable = tuners.apply(testing.toy_mlp(), "lora", r=16, lora_alpha=8, use_rslora=True, target_modules=["up"])
    assert plain.blocks[0].up.scaling["default"] == pytest.approx(8 / 16)
    assert stable.blocks[0].up.scaling["default"] == pytest.approx(8 / math.sqrt(16))
    randomize_lora(stable)
    layer = stable.blocks[0].up
    x = torch.randn(3, layer.in_features)
    delta = (8 / 4) * x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    torch.testing.assert_close(layer(x) - layer.base_layer(x), delta, atol=1e-6, rtol=0)


def test_conv1d_fan_in_fan_out() -> None:
    model = tuners.apply(testing.tiny_gpt2(), "lora", r=2, lora_alpha=4, target_modules=["c_attn"])
    layer = model.transformer.h[0].attn.c_attn
    W, b = layer.base_layer.weight, layer.base_layer.bias  # Conv1D: W is (in, out) = (32, 96)
    assert layer.fan_in_fan_out and W.shape == (32, 96) and (layer.in_features, layer.out_features) == (32, 96)
    randomize_lora(model)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(2, 5, 32)
    expected = x @ W + b + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    before = W.detach().clone()
    tuners.merge(model)
    torch.testing.assert_close(W - before, (2.0 * B @ A).T, atol=1e-6, rtol=0)  # the delta, transposed
    tuners.unmerge(model)
    torch.testing.assert_close(W, before, atol=1e-6, rtol=0)


def test_dropout_only_in_training() -> None:
    model = tuners.apply(testing.toy_mlp(), "lora", r=4, lora_alpha=4, lora_dropout=0.5, target_modules=["up"])
    randomize_lora(model)
    layer = model.blocks[0].up
    x = torch.randn(8, layer.in_features)
    no_dropout = layer.base_layer(x) + x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout, atol=1e-6, rtol=0)
    layer.train()
    torch.manual_seed(0)
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, no_dropout, atol=1e-4) and not torch.allclose(first, second, atol=1e-4)


def test_adapters_stay_float32_over_a_bfloat16_base() -> None:
    model = testing.toy_mlp().to(torch.bfloat16)
    tuners.apply(model, "lora", r=2, target_modules=["up"])
    layer = model.blocks[0].up
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_rank_and_alpha_patterns() -> None:
    model = tuners.apply(testing.tiny_llama(), "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32})
    attention = [layer.self_attn for layer in model.model.layers]
    assert attention[0].v_proj.lora_A["default"].out_features == 2
    assert attention[0].q_proj.lora_A["default"].out_features == 4
    assert attention[0].q_proj.scaling["default"] == 2 and attention[1].q_proj.scaling["default"] == 8


# ------------------------------------------------------------------------------------ target matching


def test_names_match_a_whole_path_suffix() -> None:
    model = tuners.apply(testing.tiny_llama(), "lora", target_modules=["q_proj"])
    assert wrapped_paths(model) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    with pytest.raises(MethodError, match="matched no module"):
        tuners.apply(testing.tiny_llama(), "lora", target_modules=["proj"])  # "q_proj" does not end in ".proj"


def test_regex_must_match_the_whole_path() -> None:
    model = tuners.apply(testing.tiny_llama(), "lora", target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    assert wrapped_paths(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(MethodError, match="matched no module"):
        tuners.apply(testing.tiny_llama(), "lora", target_modules="q_proj")  # a string is a regex: full match
    with pytest.raises(MethodError, match="regex"):
        tuners.apply(testing.tiny_llama(), "lora", target_modules="q_proj(")


@pytest.mark.parametrize(("builder", "expected", "excluded"), [
    ("tiny_llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, "lm_head"),
    ("tiny_gpt2", {"c_attn", "c_proj", "c_fc"}, "lm_head"),
    ("tiny_bert", {"query", "key", "value", "dense"}, "classifier"),
    ("toy_mlp", {"embed", "up", "down"}, "classifier"),
])
def test_all_linear_skips_the_output_head(builder: str, expected: set[str], excluded: str) -> None:
    model = testing.BUILDERS[builder]()
    tuners.apply(model, "lora", r=2, target_modules="all-linear")
    paths = wrapped_paths(model)
    assert {path.rsplit(".", 1)[-1] for path in paths} == expected
    assert excluded not in paths
    assert not [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in p
                and not p.endswith("base_layer") and p != excluded]


@pytest.mark.parametrize(("builder", "expected"), [
    ("tiny_llama", {"q_proj", "v_proj"}), ("tiny_bert", {"query", "value"}), ("tiny_gpt2", {"c_attn"})])
def test_default_targets_per_architecture(builder: str, expected: set[str]) -> None:
    model = tuners.apply(testing.BUILDERS[builder](), "lora", r=2)
    assert {path.rsplit(".", 1)[-1] for path in wrapped_paths(model)} == expected
    assert set(tuners.adapters(model)["default"].target_modules) == expected  # the resolved default is stored


# ------------------------------------------------------------------------------------------- errors


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_method_lists_the_methods() -> None:
    with pytest.raises(MethodError) as error:
        tuners.apply(testing.toy_mlp(), "lorax")
    assert "'lorax'" in one_line(error) and "full, lora" in one_line(error)


def test_unknown_option_lists_the_valid_options() -> None:
    with pytest.raises(MethodError) as error:
        tuners.apply(testing.toy_mlp(), "lora", rank=4, target_modules=["up"])
    message = one_line(error)
    assert "'rank'" in message and "r, lora_alpha, lora_dropout, target_modules" in message
    with pytest.raises(MethodError, match="none"):
        tuners.apply(testing.toy_mlp(), "full", r=4)


@pytest.mark.parametrize(("option", "value"), [("r", 0), ("r", -2), ("lora_dropout", 1.5), ("lora_alpha", 0)])
def test_invalid_values_are_method_errors(option: str, value: float) -> None:
    with pytest.raises(MethodError) as error:
        tuners.apply(testing.toy_mlp(), "lora", target_modules=["up"], **{option: value})
    assert f"{option}={value!r}" in one_line(error)


def test_no_matching_target_lists_the_available_modules() -> None:
    with pytest.raises(MethodError) as error:
        tuners.apply(testing.toy_mlp(), "lora", target_modules=["foo"])
    assert one_line(error) == ("target_modules ['foo'] matched no module; "
                               "available Linear modules: classifier, down, embed, up")


def test_available_modules_are_truncated() -> None:
    model = nn.ModuleDict({f"layer{i:02d}": nn.Linear(2, 2) for i in range(25)})
    with pytest.raises(MethodError) as error:
        tuners.apply(model, "lora", target_modules=["foo"])
    assert one_line(error).endswith("layer19, ... (5 more)")


def test_no_default_targets_for_an_unknown_architecture() -> None:
    with pytest.raises(MethodError, match="no default target_modules for ToyMLP.*available Linear modules"):
        tuners.apply(testing.toy_mlp(), "lora")


def test_a_non_linear_target_fails_before_touching_the_model() -> None:
    model = testing.tiny_llama()
    with pytest.raises(MethodError, match="is a LlamaAttention"):
        tuners.apply(model, "lora", target_modules=["q_proj", "self_attn"])
    assert not list(tuners.tuner_layers(model)) and all(p.requires_grad for p in model.parameters())


def test_adapter_name_rules() -> None:
    model = tuners.apply(testing.toy_mlp(), "lora", target_modules=["up"])
    with pytest.raises(MethodError, match="already exists"):
        tuners.apply(model, "lora", target_modules=["up"])
    with pytest.raises(MethodError, match="invalid adapter_name"):
        tuners.apply(model, "lora", adapter_name="a.b", target_modules=["up"])
    with pytest.raises(MethodError, match="unknown adapter 'nope'; the model has: default"):
        tuners.set_active(model, ["nope"])
    with pytest.raises(MethodError, match="'full' trains the base weights and cannot share"):
        tuners.apply(model, "full", adapter_name="everything")


def test_save_and_load_errors(tmp_path) -> None:
    with pytest.raises(MethodError, match="no adapters"):
        tuners.save(testing.toy_mlp(), tmp_path)
    with pytest.raises(MethodError, match="unknown save format"):
        tuners.save(tuners.apply(testing.toy_mlp(), "lora", target_modules=["up"]), tmp_path, format="onnx")
    with pytest.raises(MethodError, match="has no HF PEFT format"):
        tuners.save(tuners.apply(testing.toy_mlp(), "full"), tmp_path, format="peft")
    with pytest.raises(MethodError, match="no adapter in"):
        tuners.load(testing.toy_mlp(), tmp_path)
    tuners.save(tuners.apply(testing.tiny_llama(), "lora", r=2), tmp_path / "llama")
    model = testing.tiny_gpt2()
    with pytest.raises(MethodError, match="matched no module"):
        tuners.load(model, tmp_path / "llama")
    assert not tuners.adapters(model)


def test_corrupt_and_unsupported_adapters_are_refused(tmp_path) -> None:
    tuners.save(tuners.apply(testing.tiny_llama(), "lora", r=2), tmp_path / "own")
    (tmp_path / "own" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MethodError, match="incomplete or corrupt"):
        tuners.load(testing.tiny_llama(), tmp_path / "own")
    tuners.save(tuners.apply(testing.tiny_llama(), "lora", r=2), tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for change, match in [({"lora_bias": True}, "lora_bias=True"), ({"peft_type": "LOHA"}, "'LOHA' .* not supported")]:
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(MethodError, match=match):
            tuners.load(testing.tiny_llama(), tmp_path / "peft")


def test_a_mismatched_adapter_is_refused_and_rolled_back(tmp_path) -> None:
    tuners.save(tuners.apply(testing.toy_mlp(), "lora", r=2, target_modules=["up"]), tmp_path)
    model = testing.ToyMLP(hidden=40)  # same names, other shapes
    with pytest.raises(MethodError, match="has shape"):
        tuners.load(model, tmp_path)
    assert not tuners.adapters(model) and not list(tuners.tuner_layers(model))


# ------------------------------------------------------------------------------- several adapters


def test_adapters_on_different_modules_and_delete(tmp_path) -> None:
    model = testing.tiny_llama()
    tuners.apply(model, "lora", adapter_name="query", target_modules=["q_proj"])
    tuners.apply(model, "lora", adapter_name="value", target_modules=["v_proj"])
    tuners.set_active(model, ["query", "value"])
    assert model.model.layers[0].self_attn.q_proj.active_adapters == ("query",)
    tuners.save(model, tmp_path)
    tuners.delete_adapter(model, "query")
    assert not isinstance(model.model.layers[0].self_attn.q_proj, LoraLayer)
    assert tuners.active_adapters(model) == ["value"]
    renamed = tuners.load(testing.tiny_llama(), tmp_path, adapter_name="value")
    assert list(tuners.adapters(renamed)) == ["value"]
    with pytest.raises(MethodError, match="holds adapters query, value"):
        tuners.load(testing.tiny_llama(), tmp_path, adapter_name="other")


def test_merged_adapters_must_be_unmerged_before_switching() -> None:
    model = tuners.apply(testing.toy_mlp(), "lora", target_modules=["up"])
    tuners.apply(model, "lora", adapter_name="other", target_modules=["up"])
    tuners.merge(model)
    with pytest.raises(MethodError, match="unmerge"):
        tuners.set_active(model, ["default"])
    with pytest.raises(MethodError, match="unmerge"), tuners.disabled(model):
        pass
    with pytest.raises(MethodError, match="not active"):
        tuners.merge(model, ["default"])
    tuners.unmerge(model)
    tuners.set_active(model, ["default"])


def test_modules_to_save_trains_a_copy_of_the_head() -> None:
    model = testing.tiny_bert()
    head = model.classifier
    tuners.apply(model, "lora", r=2, modules_to_save=["classifier"])
    assert isinstance(model.classifier, ModulesToSaveLayer) and model.classifier.base_layer is head
    assert not head.weight.requires_grad and model.classifier.modules_to_save["default"].weight.requires_grad
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    bare = tuners.unload(model, merge=True)
    assert bare.classifier is not head and torch.equal(bare.classifier.weight, head.weight + 1.0)
