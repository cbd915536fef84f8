"""DoRA checks the matrix cannot make: the equation by hand, the factored norm, the detached-norm
gradient, dropout, stacked adapters, and parity with HF PEFT's DoRA both ways (Llama, BERT, GPT-2).

Parity numbers are PEFT's own forward passes (peft >= 0.17; written against 0.21) on a deep copy of
the same seeded base model, with every adapter tensor randomised so that the DoRA update is far from
zero (a guard asserts that the adapted logits differ from the base).
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity_helpers import assert_parity, logits
from torch import nn

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing
from tunelab.tuners.lora import dora


@torch.no_grad()
def randomize(named_parameters, seed: int = 0, scale: float = 0.3) -> None:
    """Random values on every trainable tensor (B, A, the magnitude, head copies)."""
    generator = torch.Generator().manual_seed(seed)
    for _, parameter in named_parameters:
        if parameter.requires_grad:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def by_hand(layer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """``h = m * (W + s B A) / ||W + s B A||_row x + b`` with the dense norm."""
    W = layer.get_base_weight()  # (out, in)
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    direction = W + layer.scaling[name] * B @ A
    merged = layer.lora_magnitude_vector[name][:, None] * direction / direction.norm(dim=1, keepdim=True)
    bias = layer.base_layer.bias
    return x @ merged.T + (0 if bias is None else bias)


# ------------------------------------------------------------------------------------------- the math


def test_dora_equation_by_hand() -> None:
    model = tuners.apply(testing.toy_mlp(), "dora", r=4, lora_alpha=8, target_modules=["up"])
    layer = model.blocks[0].up
    W = layer.get_base_weight()
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], W.norm(dim=1), atol=1e-6, rtol=0)  # m = ||W||
    randomize(model.named_parameters())
    x = torch.randn(5, layer.in_features)
    torch.testing.assert_close(layer(x), by_hand(layer, x), atol=1e-6, rtol=0)


def test_conv1d_layout_by_hand() -> None:
    model = tuners.apply(testing.tiny_gpt2(), "dora", r=2, lora_alpha=4, target_modules=["c_attn"])
    layer = model.transformer.h[0].attn.c_attn
    randomize(model.named_parameters())
    x = torch.randn(2, 3, layer.in_features)
    torch.testing.assert_close(layer(x), by_hand(layer, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank", [1, 4, 32])  # 32 > a quarter of the layer: the dense formula
def test_factored_norm_equals_dense_norm(rank: int) -> None:
    generator = torch.Generator().manual_seed(rank)
    W, A, B = (torch.randn(shape, generator=generator) for shape in [(48, 64), (rank, 64), (48, rank)])
    expected = (W + 0.7 * B @ A).norm(dim=1)
    torch.testing.assert_close(dora.row_norm(W, A, B, 0.7), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dora.row_norm(W.T.contiguous().T, A, B, 0.7, W.pow(2).sum(1)), expected,
                               atol=1e-5, rtol=1e-5)


def test_norm_is_detached_in_the_gradient() -> None:
    """Section 4.3: gradients are those of m * (W + s B A) x / c with c = ||W + s B A|| held constant."""
    model = tuners.apply(testing.toy_mlp(), "dora", r=4, lora_alpha=8, target_modules=["up"])
    layer = model.blocks[0].up
    randomize(model.named_parameters())
    x = torch.randn(5, layer.in_features)
    layer(x).pow(2).sum().backward()
    ours = [p.grad.clone() for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                     layer.lora_magnitude_vector["default"])]
    A, B, m = (p.detach().clone().requires_grad_(True) for p in (layer.lora_A["default"].weight,
                                                                  layer.lora_B["default"].weight,
                                                                  layer.lora_magnitude_vector["default"]))
    direction = layer.get_base_weight() + layer.scaling["default"] * B @ A
    merged = m[:, None] * direction / direction.norm(dim=1, keepdim=True).detach()
    (x @ merged.T + layer.base_layer.bias).pow(2).sum().backward()
    for got, expected in zip(ours, (A.grad, B.grad, m.grad), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("small_factor", [False, True])  # True: some |g| < 1e-3, u is kept instead of h
def test_fused_scale_gradients_equal_autograd(with_bias: bool, small_factor: bool) -> None:
    """DoraScale rebuilds u - b = (h - b) / g in backward; gradcheck in float64 on both paths."""
    generator = torch.Generator().manual_seed(3)
    result, lora_out = (torch.randn(2, 3, 6, generator=generator, dtype=torch.float64, requires_grad=True)
                        for _ in range(2))
    magnitude = (torch.rand(6, generator=generator, dtype=torch.float64) + 0.5).requires_grad_(True)
    norm = torch.rand(6, generator=generator, dtype=torch.float64) + 0.5
    if small_factor:
        with torch.no_grad():
            magnitude[2] = 1e-5
    bias = torch.randn(6, generator=generator, dtype=torch.float64) if with_bias else None
    torch.autograd.gradcheck(lambda r, o, m: dora.DoraScale.apply(r, o, 0.7, m, norm, bias),
                             (result, lora_out, magnitude))
    out = dora.DoraScale.apply(result, lora_out, 0.7, magnitude, norm, bias)
    g = magnitude / norm
    expected = g * (result + 0.7 * lora_out) + (0 if bias is None else (1 - g) * bias)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded."""
    storages: dict[int, int] = {}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum()
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


def test_dora_keeps_no_activation_beyond_lora_when_the_next_op_keeps_the_output() -> None:
    """The layer keeps its output h, which SiLU keeps anyway: LoRA's saved bytes plus two (out,)
    vectors (g and the norm), while the plain autograd formulation keeps one more (tokens, out) tensor."""
    def build(method: str) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 8))
        return tuners.apply(model, method, r=4, lora_alpha=8, target_modules=["0"]).train()

    x = torch.randn(16, 32, requires_grad=True)
    extra = saved_activation_bytes(build("dora"), x) - saved_activation_bytes(build("lora"), x)
    assert extra == 2 * 64 * 4  # g and the norm; a kept u would add 16 * 64 * 4 bytes


def test_norm_follows_training_steps() -> None:
    """The cached norm must be recomputed after every optimizer step (A and B changed)."""
    model = tuners.apply(testing.toy_mlp(), "dora", r=4, lora_alpha=8, target_modules=["up"])
    layer = model.blocks[0].up
    optimizer = torch.optim.SGD([p for _, p in tuners.trainable_parameters(model)], lr=0.5)
    batch = testing.example_batch(model)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert layer.lora_B["default"].weight.abs().max() > 0
    x = torch.randn(4, layer.in_features)
    torch.testing.assert_close(layer(x), by_hand(layer, x), atol=1e-6, rtol=0)


def test_dropout_in_training_follows_peft() -> None:
    """With dropout d = dropout(x): h = base(x) + (g - 1) W d + g s B A d (HF PEFT's DoRA rule)."""
    model = tuners.apply(testing.toy_mlp(), "dora", r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["up"])
    layer = model.blocks[0].up
    randomize(model.named_parameters())
    mask = (torch.arange(layer.in_features) % 3 != 0).float() * 2.0

    class FixedDropout(nn.Module):
        def forward(self, x):
            return x * mask

    layer.lora_dropout["default"] = FixedDropout()
    layer.train()
    x = torch.randn(5, layer.in_features)
    W, A, B = layer.get_base_weight(), layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s, m = layer.scaling["default"], layer.lora_magnitude_vector["default"]
    g = m / (W + s * B @ A).norm(dim=1)
    d = x * mask
    expected = layer.base_layer(x) + (g - 1) * (d @ W.T) + g * s * (d @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------- merge and stacking


def test_merge_is_exact_and_unmerge_restores_the_weight() -> None:
    model = tuners.apply(testing.toy_mlp(), "dora", r=4, lora_alpha=8, target_modules=["up", "down"])
    randomize(model.named_parameters())
    layer = model.blocks[0].up
    W = layer.get_base_weight().clone()
    x = torch.randn(3, layer.in_features)
    expected = by_hand(layer, x)
    tuners.merge(model)
    torch.testing.assert_close(layer.base_layer(x), expected, atol=1e-6, rtol=0)
    tuners.unmerge(model)
    torch.testing.assert_close(layer.get_base_weight(), W, atol=1e-6, rtol=0)


def test_stacked_adapters_merge_in_order() -> None:
    """Two active DoRA adapters (and a LoRA one) compose as in PEFT; merging keeps the outputs."""
    model = testing.tiny_llama()
    batch = testing.example_batch(model)
    for seed, (method, name) in enumerate([("dora", "a"), ("lora", "b"), ("dora", "c")]):
        known = {id(p) for p in model.parameters()}
        tuners.apply(model, method, adapter_name=name, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
        randomize([(n, p) for n, p in model.named_parameters() if id(p) not in known], seed=seed)
    tuners.set_active(model, ["a", "b", "c"])
    unmerged = logits(model, batch)
    tuners.merge(model, ["a"])  # partial merge: c's norm must still use the weight without a
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)
    tuners.unmerge(model)
    tuners.merge(model)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)
    tuners.unmerge(model)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- config and io


def test_use_dora_on_lora_equals_the_dora_method(tmp_path) -> None:
    batch = testing.example_batch(testing.tiny_llama())
    torch.manual_seed(0)
    via_lora = tuners.apply(testing.tiny_llama(), "lora", r=4, use_dora=True)
    torch.manual_seed(0)
    via_dora = tuners.apply(testing.tiny_llama(), "dora", r=4)
    randomize(via_lora.named_parameters())
    randomize(via_dora.named_parameters())
    torch.testing.assert_close(logits(via_lora, batch), logits(via_dora, batch), atol=0, rtol=0)
    tuners.save(via_lora, tmp_path)
    again = tuners.load(testing.tiny_llama(), tmp_path)
    assert tuners.adapters(again)["default"].use_dora
    torch.testing.assert_close(logits(again, batch), logits(via_lora, batch), atol=1e-6, rtol=0)


def test_dora_method_refuses_use_dora_false() -> None:
    with pytest.raises(MethodError, match="use_dora"):
        tuners.apply(testing.toy_mlp(), "dora", use_dora=False, target_modules=["up"])


# ------------------------------------------------------------------------------------- PEFT parity

PARITY_CASES = {
    "llama": ("tiny_llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), {}),
    "bert": ("tiny_bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
             dict(task_type="SEQ_CLS")),
    "gpt2": ("tiny_gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"]), dict(fan_in_fan_out=True)),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_peft_loads_our_dora_adapter(case: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    builder, options, _ = PARITY_CASES[case]
    base = testing.BUILDERS[builder](seed=0)
    batch = testing.example_batch(base)
    model = tuners.apply(copy.deepcopy(base), "dora", **options)
    randomize(model.named_parameters())
    tuners.save(model, tmp_path, format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert reference.peft_config["default"].use_dora
    assert_parity(logits(model, batch), logits(reference, batch), logits(base, batch))


@pytest.mark.parity
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_we_load_a_peft_dora_adapter(case: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    builder, options, peft_options = PARITY_CASES[case]
    base = testing.BUILDERS[builder](seed=0)
    batch = testing.example_batch(base)
    config = peft.LoraConfig(use_dora=True, **{k: v for k, v in options.items() if k != "modules_to_save"},
                             **peft_options)
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    randomize(reference.named_parameters())
    reference.save_pretrained(str(tmp_path))
    ours = tuners.load(copy.deepcopy(base), tmp_path)
    assert tuners.adapters(ours)["default"].method == "dora"
    assert_parity(logits(ours, batch), logits(reference, batch), logits(base, batch))
    trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert sum(p.numel() for _, p in tuners.trainable_parameters(ours)) == trainable
