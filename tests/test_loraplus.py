"""LoRA+: optimizer groups equal HF PEFT's ``create_loraplus_optimizer``; the experiment option; training.

The reference is PEFT's own function (peft >= 0.14; written against 0.21) on a PEFT model with the same
adapter config; parameter names are compared after removing PEFT's ``base_model.model.`` prefix and
the ``.weight`` of its DoRA magnitude modules (tunelab keeps the magnitude as a plain parameter).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from tunelab import tuners
from tunelab.errors import ConfigError
from tunelab.models import testing
from tunelab.train.param_groups import loraplus_groups
from tunelab.tuners.base import BaseTunerLayer
from tunelab.tuners.lora.loraplus import configured_ratio


def names_by_group(model: nn.Module, groups: list[dict]) -> list[tuple[float, float, list[str]]]:
    """``[(lr, weight_decay, [parameter names])]`` with names normalised to tunelab's."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    normalise = lambda n: re.sub(r"(lora_magnitude_vector\.[^.]+)\.weight$", r"\1", n.removeprefix("base_model.model."))  # noqa: E731
    return [(g["lr"], g["weight_decay"], [normalise(name_of[id(p)]) for p in g["params"]]) for g in groups]


CASES = {
    "llama-lora": ("tiny_llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), {}),
    "bert-dora-head": ("tiny_bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                        modules_to_save=["classifier"], use_dora=True), dict(task_type="SEQ_CLS")),
    "gpt2-lora": ("tiny_gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]), dict(fan_in_fan_out=True)),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(CASES))
def test_groups_equal_peft_create_loraplus_optimizer(case: str) -> None:
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    builder, options, peft_options = CASES[case]
    base = testing.BUILDERS[builder](seed=0)
    ours = tuners.apply(copy.deepcopy(base), "lora", **options)
    groups = tuners.loraplus_param_groups(ours, lr=2e-4, ratio=8.0, weight_decay=0.01)
    peft_config = peft.LoraConfig(**{k: v for k, v in options.items() if k != "modules_to_save"}, **peft_options)
    reference = peft.get_peft_model(copy.deepcopy(base), peft_config)
    optimizer = create_loraplus_optimizer(reference, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=8.0,
                                          loraplus_weight_decay=0.01)
    expected = names_by_group(reference, optimizer.param_groups)
    assert names_by_group(ours, groups) == expected
    assert expected[2][2] and expected[0][2]  # non-vacuous: both A and B groups hold parameters
    if "dora" in case:
        assert any("lora_magnitude_vector" in name for name in expected[2][2])  # 1-D -> B group (PEFT's rule)
        assert any(name.endswith("bias") for name in expected[3][2])  # head bias -> B without decay


class EmbeddingAdapter(BaseTunerLayer):
    """A minimal adapter layer on an ``nn.Embedding`` (tunelab's LoRA wraps Linear layers only)."""

    adapter_attribute_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict({"default": nn.Parameter(torch.zeros(2, base_layer.num_embeddings))})
        self.lora_embedding_B = nn.ParameterDict({"default": nn.Parameter(torch.zeros(base_layer.embedding_dim, 2))})

    def forward(self, x):
        return self.base_layer(x)


def test_embedding_adapters_get_their_own_rate() -> None:
    model = tuners.apply(testing.tiny_llama(), "lora", r=2, target_modules=["q_proj"])
    model.model.embed_tokens = EmbeddingAdapter(model.model.embed_tokens)
    groups = tuners.loraplus_param_groups(model, lr=1e-3, ratio=16, lr_embedding=5e-5)
    assert [g["lr"] for g in groups] == [1e-3, 5e-5, pytest.approx(16e-3), pytest.approx(16e-3)]
    embedding = {id(p) for p in model.model.embed_tokens.parameters() if p.requires_grad}
    assert {id(p) for p in groups[1]["params"]} == embedding and len(embedding) == 2
    assert not embedding & {id(p) for g in (groups[0], groups[2], groups[3]) for p in g["params"]}


def test_b_matrices_move_ratio_times_faster_under_sgd() -> None:
    """With plain SGD the first step's update is lr x grad: B's relative step is exactly the ratio."""
    model = tuners.apply(testing.toy_mlp(), "lora", r=4, target_modules=["up"], init_lora_weights=False)
    layer = model.blocks[0].up
    batch = testing.example_batch(model)
    model(**batch).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.SGD(tuners.loraplus_param_groups(model, lr=0.01, ratio=16)).step()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            lr = 0.16 if "lora_B" in name else 0.01
            torch.testing.assert_close(before[name] - parameter.detach(), lr * grads[name], atol=1e-7, rtol=1e-5)
    assert layer.lora_B["default"].weight.grad.abs().max() > 0


def test_the_config_option_turns_it_on_in_experiments() -> None:
    plain = tuners.apply(testing.tiny_llama(), "lora", r=2)
    assert configured_ratio(plain) is None and loraplus_groups(plain, 1e-3, 0.0) is None
    model = tuners.apply(testing.tiny_llama(), "dora", r=2, loraplus_lr_ratio=4.0)
    groups = loraplus_groups(model, 1e-3, 0.1)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.1), (1e-6, 0.1), (4e-3, 0.1), (4e-3, 0.0)]
    tuners.apply(model, "lora", adapter_name="other", r=2, loraplus_lr_ratio=8.0)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        configured_ratio(model)


def test_train_accepts_the_groups(tmp_path) -> None:
    from tunelab.train import TrainConfig, train

    model = tuners.apply(testing.toy_mlp(), "lora", r=2, target_modules=["up", "down"])
    records = [{"x": torch.randn(16), "label": i % 3} for i in range(8)]

    def collate(rows):
        return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.tensor([r["label"] for r in rows])}

    config = TrainConfig(learning_rate=1e-2, max_steps=3, batch_size=4, schedule="constant", warmup_ratio=0.0,
                         eval_every=100, save_every=100, log_every=1)
    result = train(model, records, collate, config, param_groups=tuners.loraplus_param_groups(model, 1e-2, 16),
                   progress=False)
    assert result.steps == 3
    assert all(layer.lora_B["default"].weight.abs().max() > 0 for _, layer in tuners.tuner_layers(model))
