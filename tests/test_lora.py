"""LoRA checks the matrix cannot make: the equation by hand, rsLoRA, Conv1D, dropout, dtypes, rank patterns.

What the generic core does for every method (target matching, errors, several adapters, heads) is in
test_core.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tunelab import tuners
from tunelab.models import testing
from tunelab.tuners.lora.lora import LoraLayer


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
