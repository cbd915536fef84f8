"""Parity with HF PEFT (the reference implementation of LoRA), both directions, on tiny random models.

(a) tunelab LoRA -> ``save(format="peft")`` -> ``peft.PeftModel.from_pretrained`` gives the same logits;
(b) ``peft.get_peft_model`` LoRA -> ``save_pretrained`` -> ``tuners.load`` gives the same logits;
(c) task models (``*ForSequenceClassification`` / ``*ForTokenClassification``) with default options:
    the head is trained and saved as PEFT's SEQ_CLS / TOKEN_CLS do, and PEFT loads the export.
The reference numbers are PEFT's own forward passes (peft >= 0.17; written against 0.21) on a deep
copy of the same seeded base model. B is randomised so the LoRA delta is far from zero; a guard
asserts the adapted logits differ from the base, so parity cannot hold vacuously.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity_helpers import TASK_MODELS, assert_parity, logits, task_batch

from tunelab import tuners
from tunelab.models import testing

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.parity



@torch.no_grad()
def randomize(named_parameters, seed: int = 0) -> None:
    """Random values for every LoRA B (so B A != 0), (IA)³ vector and trainable head copy."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in named_parameters:
        if "lora_B" in name or "modules_to_save" in name or "ia3_l" in name:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


EXPORT_CASES = {
    "llama-default-targets": ("tiny_llama", dict(r=4, lora_alpha=8)),
    "llama-rslora-many-targets": ("tiny_llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "llama-regex-patterns": ("tiny_llama", dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|down_proj)",
                                                rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 16})),
    "bert-head-copy": ("tiny_bert", dict(r=4, lora_alpha=8, modules_to_save=["classifier"])),
    "gpt2-conv1d": ("tiny_gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])),
    "gpt2-all-linear": ("tiny_gpt2", dict(r=2, lora_alpha=4, target_modules="all-linear")),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_peft_loads_our_adapter(case: str, tmp_path) -> None:
    builder, options = EXPORT_CASES[case]
    base = testing.BUILDERS[builder](seed=0)
    batch = testing.example_batch(base)
    base_logits = logits(base, batch)
    model = tuners.apply(copy.deepcopy(base), "lora", **options)
    randomize(model.named_parameters())
    tuners.save(model, tmp_path, format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_parity(logits(model, batch), logits(reference, batch), base_logits)


IMPORT_CASES = {
    "llama": ("tiny_llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "llama-rslora-all-linear": ("tiny_llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                                                 task_type="CAUSAL_LM")),
    "llama-rank-pattern": ("tiny_llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                              rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 2})),
    "bert-seq-cls": ("tiny_bert", dict(r=4, lora_alpha=8, target_modules=["query", "key", "value"],
                                       task_type="SEQ_CLS")),
    "gpt2-conv1d": ("tiny_gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_we_load_a_peft_adapter(case: str, tmp_path) -> None:
    builder, options = IMPORT_CASES[case]
    base = testing.BUILDERS[builder](seed=0)
    batch = testing.example_batch(base)
    base_logits = logits(base, batch)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))
    randomize(reference.named_parameters())
    reference.save_pretrained(str(tmp_path))
    ours = tuners.load(copy.deepcopy(base), tmp_path)
    assert_parity(logits(ours, batch), logits(reference, batch), base_logits)
    assert tuners.active_adapters(ours) == ["default"]


def test_import_then_export_round_trips_through_peft(tmp_path) -> None:
    base = testing.tiny_gpt2(seed=0)
    batch = testing.example_batch(base)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                                         fan_in_fan_out=True))
    randomize(reference.named_parameters())
    reference.save_pretrained(str(tmp_path / "peft"))
    ours = tuners.load(copy.deepcopy(base), tmp_path / "peft", adapter_name="imported")
    tuners.save(ours, tmp_path / "again", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again"))
    assert_parity(logits(again, batch), logits(reference, batch), logits(base, batch))


# ------------------------------------------------------------- task heads with default options (issue 9)

HEAD_METHODS = {"lora": dict(r=4, lora_alpha=8), "dora": dict(r=4, lora_alpha=8), "ia3": {}}
HEAD_MODELS = ["bert-seq-cls", "bert-token-cls", "llama-seq-cls", "gpt2-seq-cls"]


@pytest.mark.parametrize("model_name", HEAD_MODELS)
@pytest.mark.parametrize("method", list(HEAD_METHODS))
def test_peft_loads_a_task_model_adapter_with_its_head(method: str, model_name: str, tmp_path) -> None:
    """Default options on a classifier: the trained head is exported, and PEFT gives the same logits.

    Before issue 9 the head stayed frozen and out of the file, which PEFT's SEQ_CLS loader refuses
    (``KeyError: 'base_model.model.classifier.weight'``).
    """
    base = TASK_MODELS[model_name]()
    batch = task_batch(base)
    model = tuners.apply(copy.deepcopy(base), method, **HEAD_METHODS[method])
    randomize(model.named_parameters())
    tuners.save(model, tmp_path, format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_parity(logits(model, batch), logits(reference, batch), logits(base, batch))
    head = "classifier" if model_name.startswith("bert") else "score"
    assert reference.peft_config["default"].task_type == ("TOKEN_CLS" if "token" in model_name else "SEQ_CLS")
    trained = getattr(model, head).modules_to_save["default"].weight
    torch.testing.assert_close(getattr(reference.base_model.model, head).modules_to_save["default"].weight, trained)


def test_a_deliberately_headless_export_still_loads(tmp_path) -> None:
    """``modules_to_save=None`` (the caller's choice wins): no task_type, PEFT runs the base model's head."""
    base = TASK_MODELS["bert-seq-cls"]()
    batch = task_batch(base)
    model = tuners.apply(copy.deepcopy(base), "lora", r=4, lora_alpha=8, modules_to_save=None)
    randomize(model.named_parameters())
    tuners.save(model, tmp_path, format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_parity(logits(model, batch), logits(reference, batch), logits(base, batch))


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_we_load_a_peft_seq_cls_adapter_with_its_head(method: str, tmp_path) -> None:
    base = TASK_MODELS["llama-seq-cls"]()
    batch = task_batch(base)
    config = (peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS") if method == "lora"
              else peft.IA3Config(task_type="SEQ_CLS"))
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    randomize(reference.named_parameters())
    reference.save_pretrained(str(tmp_path))
    ours = tuners.load(copy.deepcopy(base), tmp_path)
    assert_parity(logits(ours, batch), logits(reference, batch), logits(base, batch))
