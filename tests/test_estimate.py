"""tunelab.experiments.estimate against published numbers.

- QLoRA (Dettmers et al. 2023): LLaMA-65B, NF4 + double quantization, LoRA r=64 on all linear layers
  in bf16, batch 1, gradient checkpointing, fits one 48 GB GPU.
- LLaMA-Factory's README hardware table (GB, batch 1, short sequences): LoRA 16-bit 7B 16 GB; QLoRA
  4-bit 7B 6 GB and 70B 48 GB; full fine-tuning with mixed precision ("32" bits) 7B 120 GB. The table is
  coarse (18x bytes for full fine-tuning where ours counts 16), so the check is ±20%.
- The parameter counts of the shapes equal the published sizes (1.24B, 6.74B, 65.2B, 69.0B).
"""

from __future__ import annotations

import pytest

from tunelab.errors import ConfigError
from tunelab.experiments.estimate import MODELS, NF4_BYTES, estimate_memory, train_hours


def test_shapes_have_the_published_parameter_counts():
    expected = {"llama-3.2-1b": 1.24e9, "llama-7b": 6.74e9, "llama-65b": 65.2e9, "llama-2-70b": 69.0e9}
    for name, count in expected.items():
        assert MODELS[name].params == pytest.approx(count, rel=0.01)


def test_qlora_65b_fits_48_gb():
    estimate = estimate_memory("llama-65b", "qlora", batch=1, seq=512, r=64, adapter_bytes=2)
    assert 35 < estimate.total < 48  # GiB; the paper: a 48 GB GPU
    # the NF4 weights are most of it: 4.127 bits x 64.2B linear params
    assert estimate.weights == pytest.approx((MODELS["llama-65b"].linear_params * NF4_BYTES
                                              + MODELS["llama-65b"].other_params * 2
                                              + MODELS["llama-65b"].lora_params(64) * 2) / 2**30)


@pytest.mark.parametrize(("model", "method", "table_gb"), [
    ("llama-7b", "lora", 16), ("llama-7b", "qlora", 6), ("llama-2-70b", "qlora", 48), ("llama-7b", "full", 120),
])
def test_llama_factory_hardware_table(model, method, table_gb):
    assert estimate_memory(model, method, batch=1, seq=512).total == pytest.approx(table_gb, rel=0.2)


def test_sharding_divides_what_it_shards():
    alone = estimate_memory("llama-2-70b", "full")
    zero2 = estimate_memory("llama-2-70b", "full", gpus=8, sharding="zero2")
    fsdp = estimate_memory("llama-2-70b", "full", gpus=8, sharding="fsdp")
    assert zero2.weights == alone.weights and zero2.adapter == pytest.approx(alone.adapter / 8)
    assert fsdp.weights == pytest.approx(alone.weights / 8) and fsdp.adapter == pytest.approx(alone.adapter / 8)
    with pytest.raises(ConfigError):
        estimate_memory("llama-7b", "dora")


def test_time_follows_the_6n_rule():
    # full fine-tuning without checkpointing: 6 N FLOPs per token
    hours = train_hours("llama-7b", "full", 1e9, gpus=1, peak_tflops=100, mfu=1.0, checkpointing=False)
    assert hours == pytest.approx(6 * MODELS["llama-7b"].params * 1e9 / 100e12 / 3600)
    assert train_hours("llama-7b", "lora", 1e9, checkpointing=False) < train_hours("llama-7b", "full", 1e9,
                                                                                  checkpointing=False)
