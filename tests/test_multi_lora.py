"""Multi-LoRA combination: the math of each combination, weighted activation, and the learned mixture."""

from __future__ import annotations

import math

import pytest
import torch
from parity_helpers import logits
from torch import nn

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing
from tunelab.tuners.lora import multi_lora

TARGETS = ["q_proj", "v_proj", "down_proj"]


def two_adapters(ranks=(2, 4), rank_pattern_b=None) -> nn.Module:
    """tiny_llama with LoRA adapters "a" (rank 2) and "b" (rank 4, alpha 16, optional rank_pattern)."""
    model = testing.tiny_llama()
    tuners.apply(model, "lora", adapter_name="a", r=ranks[0], lora_alpha=4, target_modules=TARGETS,
                 init_lora_weights=False)
    tuners.apply(model, "lora", adapter_name="b", r=ranks[1], lora_alpha=16, target_modules=TARGETS[1:],
                 rank_pattern=rank_pattern_b or {}, init_lora_weights=False)
    return model


def deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {path: layer.delta_weight(name).detach() for path, layer in tuners.tuner_layers(model)
            if name in layer.lora_A}


def weighted_sum(model: nn.Module, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        for path, delta in deltas(model, name).items():
            total[path] = total.get(path, 0) + weight * delta
    return total


# ------------------------------------------------------------------------------------ combinations


def test_cat_is_the_exact_weighted_sum_of_deltas() -> None:
    model = two_adapters(rank_pattern_b={"down_proj": 3})
    weights = {"a": 0.7, "b": -1.3}
    multi_lora.combine(model, list(weights), list(weights.values()), adapter_name="mix", combination="cat")
    expected = weighted_sum(model, weights)
    got = deltas(model, "mix")
    assert got.keys() == expected.keys()
    for path in expected:
        torch.testing.assert_close(got[path], expected[path], atol=1e-6, rtol=0)
    ranks = {path: layer.lora_A["mix"].out_features for path, layer in tuners.tuner_layers(model)}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.0.mlp.down_proj"] == 5
    batch = testing.example_batch(model)
    tuners.set_active(model, ["mix"])
    combined = logits(model, batch)
    multi_lora.set_weights(model, weights)  # the same function, run unmerged from the two adapters
    torch.testing.assert_close(combined, logits(model, batch), atol=1e-5, rtol=0)


def test_svd_error_is_the_discarded_singular_values() -> None:
    model = two_adapters()
    multi_lora.combine(model, ["a", "b"], [1.0, 0.5], adapter_name="svd", combination="svd", rank=3)
    expected = weighted_sum(model, {"a": 1.0, "b": 0.5})
    got = deltas(model, "svd")
    for path, delta in expected.items():
        singular = torch.linalg.svdvals(delta.double())
        discarded = singular[3:].pow(2).sum().sqrt().item()  # Eckart-Young: ||D - D_3||_F
        error = (got[path].double() - delta.double()).norm().item()
        assert error == pytest.approx(discarded, rel=1e-4, abs=1e-6)
        assert torch.linalg.matrix_norm(got[path].double() - delta.double(), ord=2) <= singular[3] * (1 + 1e-4) + 1e-7
        assert discarded > 1e-3 or path.endswith("q_proj")  # rank 3 < 2 + 4 where both adapters live
    multi_lora.combine(model, ["a", "b"], [1.0, 0.5], adapter_name="full", combination="svd", rank=6)
    for path, delta in deltas(model, "full").items():
        torch.testing.assert_close(delta, expected[path], atol=1e-5, rtol=0)


def test_linear_matches_peft_rule_and_needs_equal_ranks() -> None:
    model = two_adapters(ranks=(4, 4))
    multi_lora.combine(model, ["a"], [0.25], adapter_name="one", combination="linear")
    for path, delta in deltas(model, "one").items():  # one adapter: exactly w x delta
        torch.testing.assert_close(delta, 0.25 * deltas(model, "a")[path], atol=1e-6, rtol=0)
    multi_lora.combine(model, ["a", "b"], [1.0, 2.0], adapter_name="lin", combination="linear")
    layer = model.model.layers[0].self_attn.v_proj
    A = sum(math.sqrt(w) * layer.scaling[n] * layer.lora_A[n].weight for n, w in (("a", 1.0), ("b", 2.0)))
    B = sum(math.sqrt(w) * layer.lora_B[n].weight for n, w in (("a", 1.0), ("b", 2.0)))
    torch.testing.assert_close(layer.delta_weight("lin"), B @ A, atol=1e-6, rtol=0)
    with pytest.raises(MethodError, match="equal ranks"):
        multi_lora.combine(two_adapters(), ["a", "b"], combination="linear")


def test_ties_by_hand() -> None:
    d1 = torch.tensor([[4.0, -1.0], [0.5, 3.0]])
    d2 = torch.tensor([[-2.0, -5.0], [0.2, 1.0]])
    # density 0.5 keeps the two largest of each: d1 -> [[4, 0], [0, 3]], d2 -> [[-2, -5], [0, 0]]
    assert torch.equal(multi_lora.trim(d1, 0.5), torch.tensor([[4.0, 0.0], [0.0, 3.0]]))
    merged = multi_lora.ties([d1, d2], [1.0, 1.0], density=0.5)
    # signs of the sums: [[+, -], [0, +]]; agreeing entries averaged: 4, -5, 0, 3
    assert torch.equal(merged, torch.tensor([[4.0, -5.0], [0.0, 3.0]]))
    model = two_adapters()
    multi_lora.combine(model, ["a", "b"], adapter_name="ties", combination="ties", density=0.3, rank=8)
    inputs = {name: deltas(model, name) for name in ("a", "b")}
    for path, delta in deltas(model, "ties").items():
        present = [inputs[name][path] for name in ("a", "b") if path in inputs[name]]
        expected = multi_lora.ties(present, [1.0] * len(present), 0.3)
        singular = torch.linalg.svdvals(expected.double())
        error = (delta.double() - expected.double()).norm().item()  # TIES output, then the rank-8 SVD
        assert error == pytest.approx(singular[8:].pow(2).sum().sqrt().item(), rel=1e-4, abs=1e-6)


def test_merging_a_combined_adapter_equals_running_it_unmerged(tmp_path) -> None:
    model = two_adapters()
    batch = testing.example_batch(model)
    multi_lora.combine(model, ["a", "b"], [0.5, 1.5], adapter_name="mix", combination="svd", rank=2)
    tuners.set_active(model, ["mix"])
    unmerged = logits(model, batch)
    assert (unmerged - logits(testing.tiny_llama(), batch)).abs().max() > 1e-2
    tuners.merge(model)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)
    tuners.unmerge(model)
    tuners.save(model, tmp_path, adapter_names=["mix"], format="peft")  # an ordinary LoRA adapter, rank_pattern
    fresh = tuners.load(testing.tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(fresh, batch), unmerged, atol=1e-6, rtol=0)


def test_set_weights_scales_each_adapter() -> None:
    model = two_adapters()
    layer = model.model.layers[1].self_attn.v_proj
    x = torch.randn(3, layer.in_features)
    multi_lora.set_weights(model, {"a": 2.0, "b": -0.5})
    A_a, B_a, A_b, B_b = (layer.lora_A["a"].weight, layer.lora_B["a"].weight, layer.lora_A["b"].weight,
                          layer.lora_B["b"].weight)
    delta = 2.0 * (4 / 2) * B_a @ A_a - 0.5 * (16 / 4) * B_b @ A_b  # w_i s_i B_i A_i, s = alpha / r
    expected = layer.base_layer(x) + x @ delta.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    multi_lora.set_weights(model, {"a": 1.0})
    assert tuners.active_adapters(model) == ["a"] and layer.scaling["a"] == pytest.approx(2.0)


def test_combination_errors() -> None:
    model = two_adapters()
    tuners.apply(model, "dora", adapter_name="d", r=2, target_modules=["q_proj"])
    with pytest.raises(MethodError, match="not a plain LoRA"):
        multi_lora.combine(model, ["a", "d"])
    with pytest.raises(MethodError, match="unknown combination"):
        multi_lora.combine(model, ["a", "b"], combination="average")
    with pytest.raises(MethodError, match="one weight per adapter"):
        multi_lora.combine(model, ["a", "b"], [1.0])
    with pytest.raises(MethodError, match="unknown adapter"):
        multi_lora.set_weights(model, {"zzz": 1.0})


# --------------------------------------------------------------------------------- learned mixture


def test_mixture_trains_only_gates_and_starts_uniform(tmp_path) -> None:
    model = two_adapters()
    batch = testing.example_batch(model)
    multi_lora.set_weights(model, {"a": 0.5, "b": 0.5})
    uniform = logits(model, batch)
    multi_lora.set_weights(model, {"a": 1.0, "b": 1.0})
    multi_lora.mixture(model, ["a", "b"], adapter_name="mix")
    assert tuners.active_adapters(model) == ["mix"]
    torch.testing.assert_close(logits(model, batch), uniform, atol=1e-5, rtol=0)  # softmax(0) = 1/k each
    trainable = [name for name, _ in tuners.trainable_parameters(model)]
    assert trainable and all(".lora_gate.mix" in name for name in trainable)
    assert len(trainable) == len(multi_lora.gate_weights(model, "mix")) == 6
    optimizer = torch.optim.AdamW([p for _, p in tuners.trainable_parameters(model)], lr=0.5)
    model.train()
    before = model(**batch).loss
    before.backward()
    optimizer.step()
    gates = multi_lora.gate_weights(model, "mix")
    assert all(torch.allclose(g.sum(), torch.tensor(1.0)) for g in gates.values())
    assert any((g - 0.5).abs().max() > 0.1 for g in gates.values())
    trained = logits(model, batch)
    tuners.merge(model)
    torch.testing.assert_close(logits(model, batch), trained, atol=1e-5, rtol=0)
    tuners.unmerge(model)
    tuners.save(model, tmp_path, adapter_names=["mix"])
    fresh = tuners.load(testing.tiny_llama(), tmp_path)  # self-contained: the experts are copied in
    torch.testing.assert_close(logits(fresh, batch), trained, atol=1e-6, rtol=0)
    assert all(".lora_gate.mix" in name for name, _ in tuners.trainable_parameters(fresh))


def test_mixture_config_validates_blocks() -> None:
    with pytest.raises(MethodError, match="multiple"):
        tuners.apply(testing.toy_mlp(), "lora_mixture", r=5, experts=["a", "b"], target_modules=["up"])
