"""QLoRA beyond the matrix: exact behaviour against the *quantized* base, merge semantics, quantized
checkpoints, compute dtype, gradient checkpointing, memory of the autograd graph, and parity with
HF PEFT LoRA over bitsandbytes ``Linear4bit`` (tests/test_tuner_matrix.py holds the generic checks)."""

from __future__ import annotations

import copy

import pytest
import torch
from parity_helpers import logits
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing
from tunelab.quant import NF4Linear
from tunelab.tuners.lora import qlora


def perturbed(model, seed=1, scale=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in tuners.trainable_parameters(model):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def quantized_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, NF4Linear)}


def test_default_targets_every_linear_but_the_head_and_base_is_4bit() -> None:
    model = testing.tiny_llama()
    tuners.apply(model, "qlora", r=4)
    layers = quantized_layers(model)
    assert len(layers) == 14 and not any("lm_head" in name for name in layers)  # 2 layers x 7 projections
    assert all(layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad for layer in layers.values())
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_exact_against_the_quantized_base() -> None:
    model = testing.tiny_gpt2()
    batch = testing.example_batch(model)
    reference = copy.deepcopy(model)
    qlora.quantize_model(reference)  # the same 4-bit base, no adapters
    tuners.apply(model, "qlora", r=4, lora_alpha=8)
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=0, rtol=0)  # B = 0 at init
    tuned = logits(perturbed(model), batch)
    with tuners.disabled(model):
        torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=0, rtol=0)
    assert (tuned - logits(reference, batch)).abs().max() > 0.05


def test_merge_is_exact_and_unmerge_restores_the_codes() -> None:
    model = perturbed(tuners.apply(testing.tiny_llama(), "qlora", r=4, lora_alpha=8))
    batch = testing.example_batch(model)
    codes = {name: layer.weight.clone() for name, layer in quantized_layers(model).items()}
    tuned = logits(model, batch)
    tuners.merge(model)
    torch.testing.assert_close(logits(model, batch), tuned, atol=1e-5, rtol=0)
    tuners.unmerge(model)
    for name, layer in quantized_layers(model).items():
        assert layer.merged_weight is None and torch.equal(layer.weight, codes[name])
    torch.testing.assert_close(logits(model, batch), tuned, atol=1e-6, rtol=0)


def test_unload_gives_dense_layers_of_the_original_type_and_dtype() -> None:
    model = perturbed(tuners.apply(testing.tiny_gpt2(), "qlora", r=4, lora_alpha=8))
    batch = testing.example_batch(model)
    layer = model.transformer.h[0].attn.c_attn.base_layer
    dequantized = layer.quantized.dequantize()  # (out, in)
    tuned = logits(model, batch)
    bare = tuners.unload(copy.deepcopy(model), merge=False)
    conv = bare.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and torch.equal(conv.weight, dequantized.T)
    merged = tuners.unload(model, merge=True)
    torch.testing.assert_close(logits(merged, batch), tuned, atol=1e-5, rtol=0)


def test_save_writes_only_the_adapter(tmp_path) -> None:
    model = perturbed(tuners.apply(testing.tiny_llama(), "qlora", r=4, lora_alpha=8))
    tuners.save(model, tmp_path)
    keys = load_file(str(tmp_path / "adapter.safetensors"))
    assert keys and all(".lora_A." in key or ".lora_B." in key for key in keys)
    assert len(keys) == 2 * 14


def test_quantized_checkpoint_round_trip_then_adapter(tmp_path) -> None:
    model = testing.tiny_llama()
    batch = testing.example_batch(model)
    qlora.quantize_model(model, blocksize=32, double_quant=True)
    qlora.save_quantized(model, tmp_path / "base")
    loaded = qlora.load_quantized(testing.tiny_llama(seed=5), tmp_path / "base")  # other random weights
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)
    shells = quantized_layers(loaded)
    tuners.apply(loaded, "qlora", r=4, blocksize=32)  # already 4-bit: wrapped, not re-quantized
    assert all(module.base_layer is shells[name] for name, module in tuners.tuner_layers(loaded))
    tuners.apply(model, "qlora", r=4, blocksize=32)
    perturbed(model)
    tuners.save(model, tmp_path / "adapter")
    fresh = tuners.load(qlora.load_quantized(testing.tiny_llama(seed=7), tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=0, rtol=0)
    with pytest.raises(MethodError, match="blocksize=32"):
        tuners.apply(fresh, "qlora", adapter_name="other", blocksize=64)
    with pytest.raises(MethodError, match="has adapters"):
        qlora.save_quantized(model, tmp_path / "again")


def test_gpt2_tied_head_checkpoint(tmp_path) -> None:
    model = testing.tiny_gpt2()
    batch = testing.example_batch(model)
    qlora.quantize_model(model)
    qlora.save_quantized(model, tmp_path)
    loaded = qlora.load_quantized(testing.tiny_gpt2(seed=3), tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)


def test_compute_dtype_bfloat16() -> None:
    model = testing.tiny_llama()
    batch = testing.example_batch(model)
    full = logits(tuners.apply(copy.deepcopy(model), "qlora", r=4), batch)
    half = logits(tuners.apply(model, "qlora", r=4, compute_dtype="bfloat16"), batch)
    assert half.dtype == torch.float32
    assert 0 < (half - full).abs().max() < 0.05  # bf16 matmuls: close, not equal


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA init in both runs
        model = perturbed(tuners.apply(testing.tiny_llama(), "qlora", r=4, gradient_checkpointing=checkpointing))
        model.train()
        model(**testing.example_batch(model)).loss.backward()
        assert model.is_gradient_checkpointing == checkpointing
        grads.append(torch.cat([p.grad.flatten() for _, p in tuners.trainable_parameters(model)]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)
    with pytest.raises(MethodError, match="gradient checkpointing"):
        tuners.apply(testing.toy_mlp(), "qlora", gradient_checkpointing=True)


def test_backward_keeps_no_dequantized_weight() -> None:
    """The autograd graph holds activations and LoRA weights, never an (out, in) full-precision base."""
    model = tuners.apply(testing.tiny_llama(), "qlora", r=4)
    base_shapes = {(layer.out_features, layer.in_features) for layer in quantized_layers(model).values()}
    parameters = {p.data_ptr() for p in model.parameters()}  # e.g. lm_head's weight (64, 32) is saved as is
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**testing.example_batch(model, batch_size=3, seq_len=7)).loss  # 21 tokens: no shape clash
    loss.backward()
    assert saved and not base_shapes & set(saved)


def test_invalid_options_are_method_errors() -> None:
    with pytest.raises(MethodError, match="blocksize"):
        tuners.apply(testing.tiny_llama(), "qlora", blocksize=100)
    with pytest.raises(MethodError, match="compute_dtype"):
        tuners.apply(testing.tiny_llama(), "qlora", compute_dtype="int8")
    model = tuners.apply(testing.tiny_llama(), "lora", target_modules=["q_proj"])
    with pytest.raises(MethodError, match="full-precision"):
        tuners.apply(model, "qlora", adapter_name="q", target_modules=["q_proj"])


# ------------------------------------------------------------------------- HF PEFT + bitsandbytes


def _bnb_linear4bit(module: torch.nn.Linear, double_quant: bool, bnb) -> torch.nn.Module:
    layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=64, compress_statistics=double_quant)
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("double_quant", [False, True])
def test_outputs_match_peft_lora_over_bitsandbytes_linear4bit(double_quant: bool, tmp_path) -> None:
    """Same base, same adapter weights: PEFT over bnb Linear4bit and tunelab QLoRA give the same logits.
    Rows are multiples of the blocksize: bitsandbytes 0.50.2's CPU dequantize kernel is wrong otherwise
    (see tests/test_nf4.py)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    peft = pytest.importorskip("peft")
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    base = testing._seeded(0, lambda: LlamaForCausalLM(config))
    batch = testing.example_batch(base)
    ours = perturbed(tuners.apply(copy.deepcopy(base), "qlora", r=4, lora_alpha=8, double_quant=double_quant))
    theirs = _bnb_model(base, double_quant, bnb)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    own = dict(ours.named_parameters())
    with torch.no_grad():
        for key, parameter in theirs.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(own[key.removeprefix("base_model.model.")])
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for _, p in tuners.trainable_parameters(ours))
    tolerance = 1e-6 if double_quant is False else 1e-3  # measured: 0 and 6.5e-5
    with torch.no_grad():  # train mode: in eval mode bnb's CPU Linear4bit repacks and computes in bfloat16
        expected = ours.train()(**batch).logits
        assert (expected - theirs.train()(**batch).logits).abs().max() <= tolerance
        tuners.save(ours, tmp_path, format="peft")  # QLoRA adapters are plain PEFT LORA files
        loaded = peft.PeftModel.from_pretrained(_bnb_model(base, double_quant, bnb), tmp_path)
        assert (expected - loaded.train()(**batch).logits).abs().max() <= tolerance


def _bnb_model(base: torch.nn.Module, double_quant: bool, bnb) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for path in [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]:
        if path != "lm_head":
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, _bnb_linear4bit(model.get_submodule(path), double_quant, bnb))
    return model
