"""Bottleneck adapters beyond the matrix: where the generic mechanism inserts them, the equation, counts.

The insertion points are the sub-layers' output projections found by structure; the expected paths
below are the ones the Houlsby / Pfeiffer papers mean, written out per architecture.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing
from tunelab.tuners.adapters.bottleneck import AdapterLayer, BottleneckAdapter, find_blocks

EXPECTED_POINTS = {  # model -> (attention output projection, FFN output projection) of block i
    "tiny_llama": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"),
    "tiny_bert": ("bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"),
    "tiny_gpt2": ("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"),
}


@pytest.mark.parametrize("model_name", list(EXPECTED_POINTS))
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_generic_insertion_points(model_name: str, placement: str) -> None:
    model = testing.BUILDERS[model_name]()
    base = copy.deepcopy(model)
    batch = testing.example_batch(model)
    tuners.apply(model, "bottleneck", placement=placement, reduction_factor=8, modules_to_save=None)  # no head copy
    attention, ffn = EXPECTED_POINTS[model_name]
    expected = [p.format(i=i) for i in range(2) for p in ((attention, ffn) if placement == "houlsby" else (ffn,))]
    layers = dict(tuners.tuner_layers(model))
    assert list(layers) == expected
    assert [layer.layer_index for layer in layers.values()] == [i for i in range(2) for _ in expected[:len(expected) // 2]]
    with torch.no_grad():  # near-identity init: exactly the base (W_up = 0)
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, atol=1e-6, rtol=0)


def test_equation_by_hand() -> None:
    """h' = h + s · W_up act(W_down h + b_down) + b_up on the output of the wrapped projection."""
    torch.manual_seed(0)
    projection = torch.nn.Linear(8, 16)
    layer = AdapterLayer(projection, layer_index=0, position="ffn")
    adapter = BottleneckAdapter(16, 4, "gelu", scaling=0.5, residual=True)
    torch.nn.init.normal_(adapter.up.weight)
    torch.nn.init.normal_(adapter.up.bias)
    layer.add_adapter("a", adapter, sampler=None, leader=False)
    layer.set_active(["a"])
    x = torch.randn(3, 8)
    h = projection(x)
    expected = h + 0.5 * adapter.up(torch.nn.functional.gelu(adapter.down(h)))
    torch.testing.assert_close(layer(x), expected)
    adapter.residual = False  # ablation: the adapter output replaces h
    torch.testing.assert_close(layer(x), 0.5 * adapter.up(torch.nn.functional.gelu(adapter.down(h))))


def test_parameter_count_and_reduction_factor() -> None:
    """Per adapter 2 d m + m + d with m = d / reduction_factor; Houlsby has twice Pfeiffer's."""
    d, blocks = testing.HIDDEN, 2
    for factor, m in ((8, 4), (16, 2), (64, 1)):
        counts = {}
        for placement in ("houlsby", "pfeiffer"):
            model = tuners.apply(testing.tiny_bert(), "bottleneck", placement=placement, reduction_factor=factor,
                                  modules_to_save=None)  # adapters only, no head copy
            counts[placement] = sum(p.numel() for _, p in tuners.trainable_parameters(model))
        assert counts["pfeiffer"] == blocks * (2 * d * m + m + d)
        assert counts["houlsby"] == 2 * counts["pfeiffer"]


def test_finds_blocks_by_structure() -> None:
    stacks = find_blocks(testing.tiny_llama())
    assert [[path for path, _ in stack] for stack in stacks] == [["model.layers.0", "model.layers.1"]]
    assert [path for path, _ in find_blocks(testing.toy_mlp())[0]] == ["blocks.0", "blocks.1"]


def test_overrides_and_layers_to_transform() -> None:
    model = tuners.apply(testing.tiny_llama(), "bottleneck", placement="houlsby", attention_output="self_attn.v_proj",
                         ffn_output="mlp.up_proj", layers_to_transform=[1])
    assert [path for path, _ in tuners.tuner_layers(model)] == ["model.layers.1.self_attn.v_proj",
                                                                "model.layers.1.mlp.up_proj"]
    assert tuners.tuner_layers(model).__next__()[1].adapters["default"].down.in_features == 16  # v_proj: 2 kv heads


def test_several_adapters_add_and_train_separately() -> None:
    model = testing.tiny_gpt2()
    batch = testing.example_batch(model)
    for name in ("a", "b"):
        tuners.apply(model, "bottleneck", adapter_name=name, reduction_factor=8)
    tuners.set_active(model, ["a", "b"])
    model.train()
    model(**batch).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if "adapters" in name}
    assert grads and all(g is not None for g in grads.values())
    assert any(".a." in n for n in grads) and any(".b." in n for n in grads)


def test_user_mistakes_raise_one_line_errors() -> None:
    with pytest.raises(MethodError, match="no attention output"):
        tuners.apply(testing.toy_mlp(), "bottleneck", placement="houlsby")
    with pytest.raises(MethodError, match="out of range"):
        tuners.apply(testing.tiny_bert(), "bottleneck", layers_to_transform=[5])
    with pytest.raises(MethodError, match="is not a Linear"):
        tuners.apply(testing.tiny_bert(), "bottleneck", ffn_output="output.LayerNorm")
    # LoRA's layer stacks under an adapter (test_multi_peft.py); a trained copy (modules_to_save) does not
    copy_model = tuners.apply(testing.tiny_llama(), "lora", target_modules=["q_proj"], modules_to_save=["down_proj"])
    with pytest.raises(MethodError, match="already wrapped by ModulesToSaveLayer"):
        tuners.apply(copy_model, "bottleneck", adapter_name="adapter")
    assert tuners.adapters(copy_model).keys() == {"default"}  # untouched
    assert {type(layer).__name__ for _, layer in tuners.tuner_layers(copy_model)} == {"LoraLayer", "ModulesToSaveLayer"}
    with pytest.raises(MethodError, match="stack of transformer blocks"):
        tuners.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), "bottleneck")
    with pytest.raises(MethodError, match="placement"):
        tuners.apply(testing.tiny_bert(), "bottleneck", placement="parallel")
    with pytest.raises(MethodError, match="cannot be merged"):
        tuners.merge(tuners.apply(testing.tiny_bert(), "bottleneck"))
