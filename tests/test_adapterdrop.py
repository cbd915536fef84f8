"""AdapterDrop (Rücklé et al. 2021): dropped blocks run no adapter; parallel task adapters share the prefix.

Checks: inference dropping of the first k blocks equals zeroing those blocks' adapters by hand; robust
AdapterDrop in training draws n ∈ {0..N} per forward pass (each training output equals one of the
deterministic dropped outputs); ``parallel_adapters`` gives each adapter exactly its single-adapter
output (with padding in the batch), and with k > 0 the first k blocks see the batch once.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing
from tunelab.tuners.adapters.bottleneck import find_blocks

NAMES = ("a", "b", "c")


@torch.no_grad()
def perturb(model: torch.nn.Module, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for key, parameter in model.named_parameters():
        if f"adapters.{name}." in key:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


def tuned(builder: str, method: str = "bottleneck", names=("a",), **options) -> torch.nn.Module:
    model = testing.BUILDERS[builder](seed=0)
    defaults = dict(placement="houlsby", reduction_factor=8) if method == "bottleneck" else dict(reduction_factor=8,
                                                                                                 phm_dim=2)
    for seed, name in enumerate(names):
        tuners.apply(model, method, adapter_name=name, **{**defaults, **options})
        perturb(model, name, seed)
    return model.eval()


def batch_for(model: torch.nn.Module) -> dict:
    batch = testing.example_batch(model, batch_size=3)
    batch.pop("labels")
    batch["attention_mask"][1, -3:] = 0  # padding: the mask must be copied with the hidden states
    if "CausalLM" in type(model).__name__ or "LMHead" in type(model).__name__:
        batch["use_cache"] = False
    return batch


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).logits


@pytest.mark.parametrize("method", ["bottleneck", "compacter"])
def test_dropping_first_k_blocks_equals_removing_their_adapters(method: str) -> None:
    model = tuned("tiny_llama", method)
    batch = batch_for(model)
    full = logits(model, batch)
    tuners.set_adapter_drop(model, 1)
    dropped = logits(model, batch)
    reference = copy.deepcopy(model)
    tuners.set_adapter_drop(reference, 0)
    with torch.no_grad():
        for _, layer in tuners.tuner_layers(reference):
            if layer.layer_index == 0:
                for key, parameter in layer.adapters.named_parameters():
                    if ".up." in key and not key.endswith("rule"):  # not compacter's rule: all blocks share it
                        parameter.zero_()  # up projection = 0: the adapter is the identity
    assert (dropped - full).abs().max() > 1e-3
    torch.testing.assert_close(dropped, logits(reference, batch), atol=1e-6, rtol=0)
    tuners.set_adapter_drop(model, 2)
    with tuners.disabled(model):
        base = logits(model, batch)
    torch.testing.assert_close(logits(model, batch), base, atol=1e-6, rtol=0)


def test_robust_adapterdrop_samples_lower_blocks_each_step() -> None:
    model = tuned("tiny_bert", adapterdrop_train_layers=2)
    batch = batch_for(model)
    expected = []
    for k in range(3):
        tuners.set_adapter_drop(model, k)
        expected.append(logits(model, batch))
    tuners.set_adapter_drop(model, 0)
    model.train()  # dropout is 0 in the tiny models: training outputs differ only by AdapterDrop
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        out = logits(model, batch)
        matches = [k for k, reference in enumerate(expected) if torch.allclose(out, reference, atol=1e-6)]
        assert len(matches) >= 1
        seen.add(matches[0])
    assert seen == {0, 1, 2}
    model.eval()
    torch.testing.assert_close(logits(model, batch), expected[0])  # no dropping at inference


@pytest.mark.parametrize("builder", ["tiny_bert", "tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_parallel_adapters_equal_single_adapters(builder: str, k: int) -> None:
    model = tuned(builder, names=NAMES)
    batch = batch_for(model)
    tuners.set_adapter_drop(model, k)
    singles = []
    for name in NAMES:
        tuners.set_active(model, [name])
        singles.append(logits(model, batch))
    seen_rows = {}

    def record(index):
        def hook(module, args, kwargs):  # runs after the replication hook: sees what the block computes on
            seen_rows[index] = (args[0] if args else kwargs["hidden_states"]).shape[0]
        return hook

    with tuners.parallel_adapters(model, NAMES):
        handles = [block.register_forward_pre_hook(record(i), with_kwargs=True)
                   for i, (_, block) in enumerate(find_blocks(model)[0])]
        out = logits(model, batch)
    for handle in handles:
        handle.remove()
    assert out.shape[0] == len(NAMES) * 3
    for chunk, single in zip(out.chunk(len(NAMES)), singles, strict=True):
        torch.testing.assert_close(chunk, single, atol=1e-5, rtol=0)
    assert seen_rows == {i: (3 if i < k else 9) for i in range(2)}  # the first k blocks run once
    if k < 2:
        assert (singles[0] - singles[1]).abs().max() > 1e-3  # the adapters differ: the check is not vacuous


def test_user_mistakes_raise_one_line_errors() -> None:
    model = tuned("tiny_bert")
    with pytest.raises(MethodError, match="out of range"):
        tuners.set_adapter_drop(model, 3)
    with pytest.raises(MethodError, match="adapter names"):
        with tuners.parallel_adapters(model, ["nope"]):
            pass
    lora = tuners.apply(testing.tiny_bert(), "lora")
    with pytest.raises(MethodError, match="no bottleneck/compacter adapters"):
        tuners.set_adapter_drop(lora, 1)
    with pytest.raises(MethodError, match="adapterdrop_train_layers"):
        tuners.apply(testing.tiny_bert(), "bottleneck", adapterdrop_train_layers=-1)
