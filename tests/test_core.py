"""The generic tuner core, method by method the same: target matching, errors, several named adapters,
and task heads (``modules_to_save``) -- what every method gets from ``tuners.core`` rather than from
its own module. LoRA is the probe method where one is needed. Method math: test_<method>.py;
every method x every model x the generic checks: test_tuner_matrix.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from parity_helpers import TASK_MODELS, logits
from torch import nn

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing
from tunelab.tuners import registry
from tunelab.tuners.base import MethodConfig
from tunelab.tuners.lora.lora import LoraLayer
from tunelab.tuners.modules_to_save import ModulesToSaveLayer


def wrapped_paths(model: nn.Module) -> list[str]:
    return [path for path, layer in tuners.tuner_layers(model) if isinstance(layer, LoraLayer)]


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
                and not p.endswith("base_layer") and p.split(".")[0] != excluded]


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


def test_malformed_pickled_and_nan_adapters_are_one_line_errors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    tuners.save(tuners.apply(testing.tiny_llama(), "lora", r=2), tmp_path / "peft", format="peft")
    config_path, weights = tmp_path / "peft" / "adapter_config.json", tmp_path / "peft" / "adapter_model.safetensors"
    good_config = config_path.read_text()
    for text, match in [("{not json", "not valid JSON"), ("[1, 2]", "must hold a JSON object")]:
        config_path.write_text(text)
        with pytest.raises(MethodError, match=match) as caught:
            tuners.load(testing.tiny_llama(), tmp_path / "peft")
        assert "\n" not in str(caught.value)
    config_path.write_text(good_config)
    weights.write_bytes(b"\x00" * 40)  # truncated / corrupt safetensors
    with pytest.raises(MethodError, match="corrupt or not plain tensors"):
        tuners.load(testing.tiny_llama(), tmp_path / "peft")
    weights.unlink()
    import pickle

    (tmp_path / "peft" / "adapter_model.bin").write_bytes(pickle.dumps({"x": object()}))  # not weights-only
    with pytest.raises(MethodError, match="corrupt or not plain tensors"):
        tuners.load(testing.tiny_llama(), tmp_path / "peft")
    tuners.save(tuners.apply(testing.tiny_llama(), "lora", r=2), tmp_path / "own")
    tensors = load_file(str(tmp_path / "own" / "adapter.safetensors"))
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(tmp_path / "own" / "adapter.safetensors"))
    model = testing.tiny_llama()
    with pytest.raises(MethodError, match="NaN or infinite"):
        tuners.load(model, tmp_path / "own")
    assert not tuners.adapters(model)  # nothing half-applied


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


# --------------------------------------------------------------------- task heads (issue 9, item 8)


HEAD_OF = {"bert-seq-cls": "classifier", "bert-token-cls": "classifier", "llama-seq-cls": "score",
           "gpt2-seq-cls": "score"}
HEAD_METHODS = {"lora": dict(r=2), "dora": dict(r=2), "ia3": {}, "bottleneck": dict(reduction_factor=8),
                "prompt_tuning": dict(num_virtual_tokens=2)}


@pytest.mark.parametrize("method", list(HEAD_METHODS))
@pytest.mark.parametrize("model_name", list(HEAD_OF))
def test_a_task_head_trains_and_is_saved_by_default(model_name: str, method: str, tmp_path) -> None:
    """As HF PEFT for SEQ_CLS / TOKEN_CLS: the head goes to modules_to_save, so it trains and is saved."""
    model = TASK_MODELS[model_name]()
    head_name = HEAD_OF[model_name]
    head = getattr(model, head_name)
    tuners.apply(model, method, **HEAD_METHODS[method])
    assert tuners.adapters(model)["default"].modules_to_save == [head_name]
    wrapper = getattr(model, head_name)
    assert isinstance(wrapper, ModulesToSaveLayer) and wrapper.base_layer is head
    copy_parameters = list(wrapper.modules_to_save["default"].parameters())
    assert all(p.requires_grad for p in copy_parameters) and not any(p.requires_grad for p in head.parameters())
    trainable = {id(p) for _, p in tuners.trainable_parameters(model)}
    assert {id(p) for p in copy_parameters} <= trainable
    with torch.no_grad():  # "train" the head: the trained copy must survive a round trip
        for parameter in copy_parameters:
            parameter.add_(torch.randn_like(parameter))
    batch = testing.example_batch(model)
    batch = {key: batch[key] for key in ("input_ids", "attention_mask")}
    trained = logits(model, batch)
    tuners.save(model, tmp_path)
    fresh = tuners.load(TASK_MODELS[model_name](), tmp_path)
    torch.testing.assert_close(logits(fresh, batch), trained, atol=1e-6, rtol=0)
    with tuners.disabled(fresh):
        torch.testing.assert_close(logits(fresh, batch), logits(TASK_MODELS[model_name](), batch))


def test_an_explicit_modules_to_save_wins() -> None:
    model = tuners.apply(TASK_MODELS["bert-seq-cls"](), "lora", r=2, modules_to_save=None)
    assert not isinstance(model.classifier, ModulesToSaveLayer)
    assert not any(p.requires_grad for p in model.classifier.parameters())
    model = tuners.apply(TASK_MODELS["bert-seq-cls"](), "lora", r=2, modules_to_save=["pooler"])
    assert isinstance(model.bert.pooler, ModulesToSaveLayer) and not isinstance(model.classifier, ModulesToSaveLayer)


def test_no_head_is_added_to_models_without_a_task_head() -> None:
    # a causal LM, and a plain module that happens to have a "classifier"
    for model, options in ((testing.tiny_llama(), {}), (testing.toy_mlp(), {"target_modules": ["up"]})):
        tuners.apply(model, "lora", r=2, **options)
        assert tuners.adapters(model)["default"].modules_to_save is None
        assert not any(isinstance(layer, ModulesToSaveLayer) for _, layer in tuners.tuner_layers(model))


class HeadlessConfig(MethodConfig):
    """A method without a ``modules_to_save`` option (as CoOp / VPT / MaPLe)."""

    method = "headless"


def test_a_method_without_modules_to_save_unfreezes_the_head(monkeypatch) -> None:
    spec = registry.MethodSpec("headless", HeadlessConfig, lambda model, config, name: [])
    monkeypatch.setitem(registry._REGISTRY, "headless", spec)
    model = tuners.apply(TASK_MODELS["llama-seq-cls"](), "headless")
    assert [name for name, _ in tuners.trainable_parameters(model)] == ["score.weight"]
    model = tuners.apply(TASK_MODELS["llama-seq-cls"](), "full")
    assert all(p.requires_grad for p in model.parameters())  # full fine-tuning trains it anyway
