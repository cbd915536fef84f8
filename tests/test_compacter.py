"""Compacter beyond the matrix: the PHM equation, shared slow weights, and the paper's parameter count.

Karimi Mahabadi et al. 2021 (arXiv:2106.04647), §3: with n Kronecker summands, rank-one fast weights,
bottleneck k, hidden d and L blocks, Compacter trains n³ + 4L(k + d) parameters (biases left out) and
Compacter++ (feed-forward placement only) n³ + 2L(k + d).
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing
from tunelab.tuners.adapters.compacter import PHMLinear, expected_parameter_count, new_rule


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for _, p in tuners.trainable_parameters(model))


def test_phm_weight_is_a_sum_of_kronecker_products() -> None:
    """W = Σ_i A_i ⊗ (s_i t_iᵀ), checked against torch.kron; y = W x + b."""
    torch.manual_seed(0)
    n, rank = 4, 2
    layer = PHMLinear(in_features=12, out_features=8, rule=new_rule(n), rank=rank, bias=True)
    torch.nn.init.normal_(layer.bias)
    expected = sum(torch.kron(layer.rule[i], layer.s[i] @ layer.t[i].T) for i in range(n))  # (8, 12)
    torch.testing.assert_close(layer.weight(), expected)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), x @ expected.T + layer.bias)
    assert layer.s.shape == (n, 8 // n, rank) and layer.t.shape == (n, 12 // n, rank)


@pytest.mark.parametrize("variant,per_block", [("compacter", 2), ("compacter++", 1)])
def test_trainable_count_equals_the_papers_formula(variant: str, per_block: int) -> None:
    """Rank one, no bias: exactly n³ + 2·P·L·(k + d) (P = 2 for Compacter, 1 for Compacter++)."""
    n, d, blocks = 4, testing.HIDDEN, 2
    model = tuners.apply(testing.tiny_bert(), "compacter", variant=variant, reduction_factor=4, phm_dim=n,
                         phm_bias=False, modules_to_save=None)  # adapters only, no head copy
    k = d // 4
    assert count(model) == n**3 + 2 * per_block * blocks * (k + d)
    config = tuners.adapters(model)["default"]
    assert count(model) == expected_parameter_count(d, blocks, config)


@pytest.mark.parametrize("options", [dict(phm_bias=True), dict(phm_rank=3), dict(shared_phm_rule=False)])
def test_trainable_count_with_rank_bias_and_unshared_rules(options: dict) -> None:
    model = tuners.apply(testing.tiny_llama(), "compacter", reduction_factor=8, phm_dim=2, **options)
    assert count(model) == expected_parameter_count(testing.HIDDEN, 2, tuners.adapters(model)["default"])


def test_count_on_a_bert_base_shaped_model() -> None:
    """BERT-base shape (d = 768, L = 12) built on the meta device: no memory, same count."""
    config = BertConfig()  # the BERT-base defaults: hidden 768, 12 layers
    with torch.device("meta"):
        model = BertModel(config)
    tuners.apply(model, "compacter", phm_bias=False)  # reduction 32 -> k = 24, n = 4
    assert count(model) == 4**3 + 4 * 12 * (24 + 768)


def test_slow_weights_are_shared_and_saved_once(tmp_path) -> None:
    model = tuners.apply(testing.tiny_gpt2(), "compacter", reduction_factor=8, phm_dim=2)
    rules = {id(module.rule) for module in model.modules() if isinstance(module, PHMLinear)}
    assert len(rules) == 1  # one A stack for every down and up projection of every block
    tuners.save(model, tmp_path)
    from safetensors.torch import load_file

    assert sum(key.endswith(".rule") for key in load_file(str(tmp_path / "adapter.safetensors"))) == 1
    fresh = tuners.load(testing.tiny_gpt2(), tmp_path)
    fresh_rules = {id(module.rule) for module in fresh.modules() if isinstance(module, PHMLinear)}
    assert len(fresh_rules) == 1


def test_compacter_plus_plus_is_feed_forward_only() -> None:
    model = tuners.apply(testing.tiny_llama(), "compacter", variant="compacter++", reduction_factor=8, phm_dim=2)
    assert [path for path, _ in tuners.tuner_layers(model)] == ["model.layers.0.mlp.down_proj",
                                                                "model.layers.1.mlp.down_proj"]


def test_user_mistakes_raise_one_line_errors() -> None:
    with pytest.raises(MethodError, match="divisible by phm_dim"):
        tuners.apply(testing.tiny_bert(), "compacter", reduction_factor=16, phm_dim=4)  # k = 2
    with pytest.raises(MethodError, match="variant"):
        tuners.apply(testing.tiny_bert(), "compacter", variant="compacter+++")
