"""Efficiency figures (tunelab.experiments.efficiency): the memory summary's equations, the sampler
seeing an allocation, merged latency only where adapters fold in (weights restored after), adapter size."""

from __future__ import annotations

import time

import pytest
import torch

from tunelab import tuners
from tunelab.experiments import efficiency, report_efficiency
from tunelab.models import testing


def test_summary_is_mean_nearest_rank_p99_and_max():
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert efficiency.summarize(values) == {"mean": 50.5, "p99": 99.0, "max": 100.0, "samples": 100}
    assert efficiency.summarize([7.0]) == {"mean": 7.0, "p99": 7.0, "max": 7.0, "samples": 1}
    assert efficiency.summarize([]) is None
    both = efficiency.combine([{"mean": 10.0, "p99": 12.0, "max": 13.0, "samples": 3},
                               {"mean": 20.0, "p99": 21.0, "max": 22.0, "samples": 1}, None])
    assert both == {"mean": 12.5, "p99": 21.0, "max": 22.0, "samples": 4}  # (3·10 + 1·20) / 4


def test_the_sampler_sees_an_allocation_made_inside_its_window():
    with efficiency.MemorySampler(interval=0.01) as sampler:
        block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB of float32, touched
        time.sleep(0.15)
        del block
    summary = sampler.summary()
    assert summary["samples"] >= 3
    assert summary["max"] - sampler.samples[0] > 200  # MiB


def test_merged_latency_folds_lora_in_and_restores_it_and_is_none_where_nothing_merges():
    model = testing.tiny_llama(0)
    tuners.apply(model, "lora", r=4, target_modules="all-linear")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 64, (2, 6))
    before = model(input_ids=ids).logits
    seen = []

    def measure():
        seen.append([list(layer.merged_adapters) for _, layer in tuners.tuner_layers(model)][0])
        return 1.5

    assert efficiency.merged_latency_ms(model, measure) == 1.5
    assert seen == [["default"]]  # measured merged
    assert all(not layer.merged_adapters for _, layer in tuners.tuner_layers(model))  # and unmerged after
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    for method in ("prompt_tuning", "full"):
        other = testing.tiny_llama(0)
        tuners.apply(other, method, **({"num_virtual_tokens": 2} if method == "prompt_tuning" else {}))
        assert efficiency.merged_latency_ms(other, lambda: pytest.fail("must not measure")) is None
    assert efficiency.merged_latency_ms(testing.tiny_llama(0), lambda: 1.0) is None  # no adapters at all


def test_adapter_size_counts_the_tunelab_files_not_the_peft_copy(tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "adapter.safetensors").write_bytes(b"x" * 2**20)
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "h.bin").write_bytes(b"x" * 2**19)
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"x" * 2**20)
    assert efficiency.adapter_mb(tmp_path) == pytest.approx(1.5)
    assert efficiency.adapter_mb(tmp_path / "missing") is None


def test_the_report_section_averages_over_seeds_and_dashes_what_is_missing():
    def result(seed, merged):
        memory = {"mean": 100.0 + seed, "p99": 110.0, "max": 120.0, "samples": 5}
        return {"method_label": "lora", "train_size": 8, "efficiency": {
            "train_memory_mb": memory, "inference_memory_mb": memory, "memory_source": "rss",
            "latency_ms_unmerged": 2.0, "latency_ms_merged": merged, "adapter_mb": 0.25}}

    section = report_efficiency.markdown_section([result(0, 1.0), result(2, 1.5), {"method_label": "x"}])
    assert "| lora | 8 | 2 | 101 / 110 / 120 | 101 / 110 / 120 | 2.0 | 1.2 | 0.250 |" in section
    assert "| lora | 8 | 2 | 101 / 110 / 120 | 101 / 110 / 120 | 2.0 | – |" in \
        report_efficiency.markdown_section([result(0, None), result(2, None)])
    assert report_efficiency.markdown_section([{"method_label": "x"}]) == ""
