"""(IA)³ beyond the matrix: the equation by hand, PEFT's defaults, merge math, and parity with HF PEFT.

Parity (both directions, ≤ 1e-5): tunelab -> ``save(format="peft")`` -> ``peft.PeftModel.from_pretrained``,
and ``peft.get_peft_model(IA3Config)`` -> ``save_pretrained`` -> ``tuners.load``. The references are
PEFT's own forward passes (written against peft 0.21) on a deep copy of the same seeded tiny model; the
vectors are randomised so the adapter is far from the identity, and a guard asserts it changed the logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity_helpers import assert_parity, logits
from transformers.pytorch_utils import Conv1D

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing
from tunelab.tuners.adapters.ia3 import IA3Layer


@torch.no_grad()
def randomize(named_parameters, seed: int = 0) -> None:
    """Vectors far from one (and head copies far from the base head)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in named_parameters:
        if "ia3_l" in name or "modules_to_save" in name:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_equation_by_hand(kind: str, feedforward: bool) -> None:
    """Output scaling: l ⊙ (W x + b); input scaling: W (l ⊙ x) + b; merge folds l into W (and b)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)  # Conv1D(nf=out, nx=in)
    layer = IA3Layer(base, feedforward)
    layer.add_adapter("a", init_ia3_weights=False)
    layer.set_active(["a"])
    x = torch.randn(3, 6)
    weight = base.weight.detach() if kind == "linear" else base.weight.detach().T  # (out, in)
    vector = layer.ia3_l["a"].detach().flatten()
    expected = (x * vector) @ weight.T + base.bias if feedforward else (x @ weight.T + base.bias) * vector
    torch.testing.assert_close(layer(x), expected)
    assert layer.ia3_l["a"].shape == ((1, 6) if feedforward else (4, 1))  # PEFT's shapes
    layer.merge(["a"])
    torch.testing.assert_close(base(x), expected, atol=1e-6, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach() if kind == "linear" else base.weight.detach().T, weight,
                               atol=1e-6, rtol=0)


def test_two_adapters_multiply() -> None:
    layer = IA3Layer(torch.nn.Linear(5, 3), feedforward=False)
    for name in ("a", "b"):
        layer.add_adapter(name, init_ia3_weights=False)
    x = torch.randn(2, 5)
    layer.set_active(["a", "b"])
    product = layer.base_layer(x) * layer.ia3_l["a"].flatten() * layer.ia3_l["b"].flatten()
    torch.testing.assert_close(layer(x), product)


def test_defaults_follow_peft() -> None:
    model = tuners.apply(testing.tiny_llama(), "ia3")
    config = tuners.adapters(model)["default"]
    assert config.target_modules == ["k_proj", "v_proj", "down_proj"] and config.feedforward_modules == ["down_proj"]
    feedforward = {path.rsplit(".", 1)[-1]: layer.feedforward for path, layer in tuners.tuner_layers(model)}
    assert feedforward == {"k_proj": False, "v_proj": False, "down_proj": True}
    # 2 layers x (k: 16 + v: 16 + down: 64 inputs)
    assert sum(p.numel() for _, p in tuners.trainable_parameters(model)) == 2 * (16 + 16 + 64)


def test_user_mistakes_raise_one_line_errors() -> None:
    with pytest.raises(MethodError, match="no default"):
        tuners.apply(testing.toy_mlp(), "ia3")
    with pytest.raises(MethodError, match="subset of target_modules"):
        tuners.apply(testing.tiny_llama(), "ia3", target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(MethodError, match="only Linear"):
        tuners.apply(testing.tiny_llama(), "ia3", target_modules=["input_layernorm"], feedforward_modules=[])


peft = pytest.importorskip("peft")

EXPORT_CASES = {
    "llama-defaults": ("tiny_llama", {}),
    "llama-all-linear": ("tiny_llama", dict(target_modules="all-linear", feedforward_modules=["down_proj"])),
    "bert-head": ("tiny_bert", dict(target_modules=["key", "value", "output.dense", "pooler.dense"],
                                    feedforward_modules=["output.dense"], modules_to_save=["classifier"])),
    "gpt2-conv1d": ("tiny_gpt2", dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["c_proj"])),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_peft_loads_our_ia3_adapter(case: str, tmp_path) -> None:
    builder, options = EXPORT_CASES[case]
    base = testing.BUILDERS[builder](seed=0)
    batch = testing.example_batch(base)
    model = tuners.apply(copy.deepcopy(base), "ia3", **options)
    randomize(model.named_parameters())
    tuners.save(model, tmp_path, format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_parity(logits(model, batch), logits(reference, batch), logits(base, batch))


IMPORT_CASES = {
    "llama-defaults": ("tiny_llama", dict(task_type="CAUSAL_LM")),
    "llama-regex": ("tiny_llama", dict(target_modules=r".*\.(q_proj|v_proj|up_proj|down_proj)",
                                       feedforward_modules=r".*down_proj")),
    "bert-seq-cls": ("tiny_bert", dict(target_modules=["query", "value", "output.dense", "pooler.dense"],
                                       feedforward_modules=["output.dense"], task_type="SEQ_CLS")),
    "gpt2-conv1d": ("tiny_gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                      fan_in_fan_out=True)),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_we_load_a_peft_ia3_adapter(case: str, tmp_path) -> None:
    builder, options = IMPORT_CASES[case]
    base = testing.BUILDERS[builder](seed=0)
    batch = testing.example_batch(base)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**options))
    randomize(reference.named_parameters())
    reference.save_pretrained(str(tmp_path))
    ours = tuners.load(copy.deepcopy(base), tmp_path)
    assert_parity(logits(ours, batch), logits(reference, batch), logits(base, batch))
    assert tuners.adapters(ours)["default"].method == "ia3"


def test_merged_ia3_matches_peft_merge_and_unload(tmp_path) -> None:
    base = testing.tiny_llama(seed=0)
    batch = testing.example_batch(base)
    model = tuners.apply(copy.deepcopy(base), "ia3")
    randomize(model.named_parameters())
    tuners.save(model, tmp_path, format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).merge_and_unload()
    merged = tuners.unload(model, merge=True)
    assert_parity(logits(merged, batch), logits(reference, batch), logits(base, batch))
