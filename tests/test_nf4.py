"""NF4 + double quantization (tunelab.quant.nf4): the codebook, the rounding rule, packing, storage
size, and parity with bitsandbytes 0.50 on CPU (its pure-PyTorch quantize_4bit is the reference the
codes are compared with; see the notes on its CPU dequantize kernel below)."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.quant import dynamic_codebook, nf4_codebook, quantize_nf4
from tunelab.quant.nf4 import empty_nf4

# The NF4 table of the QLoRA paper (Appendix E) as bitsandbytes ships it (functional.get_4bit_type).
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
# Shapes whose rows are a multiple of the blocksize (bitsandbytes' CPU dequantize kernel is right for
# these) and ragged ones (odd size, partial last block, rows shorter than a block).
ALIGNED_SHAPES = [(96, 64), (688, 256), (256, 128)]
RAGGED_SHAPES = [(33, 17), (7,), (256, 688), (16, 32)]
DOUBLE_QUANT_TOLERANCE = 0.015  # measured: ≤ 1.06% of the block absmax (one 8-bit absmax code step)


def weights(shape, seed=0, scale=0.02):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def bnb_functional():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    try:
        bnb.functional.quantize_4bit(torch.ones(64), blocksize=64, quant_type="nf4")
    except Exception as error:  # pragma: no cover - depends on the installed build
        pytest.skip(f"bitsandbytes 4-bit quantization does not run on CPU here: {error}")
    return bnb.functional


def test_codebook_is_the_normal_quantile_table_of_the_paper() -> None:
    code = nf4_codebook()
    assert torch.equal(code, torch.tensor(PAPER_NF4))  # bit-identical, computed from Φ⁻¹
    assert code[7] == 0 and code.min() == -1 and code.max() == 1 and bool((code.diff() > 0).all())


def test_codes_are_the_nearest_codebook_value_of_the_block_scaled_weight() -> None:
    weight = weights((40, 64), seed=1)
    quantized = quantize_nf4(weight, blocksize=64, double_quant=False)
    blocks = weight.view(-1, 64)
    absmax = blocks.abs().max(dim=1).values
    assert torch.equal(quantized.absmax, absmax)
    distance = (blocks[..., None] / absmax[:, None, None] - nf4_codebook()).abs()  # (blocks, 64, 16)
    chosen = distance.gather(-1, quantized.codes().view(-1, 64, 1).long())
    assert torch.allclose(chosen.squeeze(-1), distance.min(dim=-1).values, atol=1e-7)
    # the largest |w| of every block is stored exactly (code ±1), and the error is at most half a code gap
    error = (quantized.dequantize() - weight).view(-1, 64).abs() / absmax[:, None]
    assert error.max() <= nf4_codebook().diff().max() / 2 + 1e-6  # the widest gap: -1 to -0.696


def test_two_codes_per_byte_high_nibble_first_and_odd_sizes() -> None:
    weight = torch.tensor([1.0, -1.0, 0.0, 0.5, 0.0])  # one block of 5 (absmax 1)
    quantized = quantize_nf4(weight, blocksize=32, double_quant=False)
    assert quantized.packed.tolist() == [(15 << 4) | 0, (7 << 4) | 12, (7 << 4) | 7]  # 0.5 -> 0.4407 (code 12)
    assert quantized.codes().tolist() == [15, 0, 7, 12, 7]
    assert quantized.dequantize().shape == weight.shape


def test_dequantize_keeps_shape_dtype_and_zero_blocks() -> None:
    weight = weights((8, 64)).to(torch.bfloat16)
    weight[0] = 0  # an all-zero block: absmax 0 must not produce NaN
    quantized = quantize_nf4(weight)
    restored = quantized.dequantize()
    assert restored.dtype == torch.bfloat16 and restored.shape == weight.shape
    assert torch.equal(restored[0], torch.zeros(64, dtype=torch.bfloat16))
    assert quantized.dequantize(torch.float32).dtype == torch.float32


def test_workspace_dequantize_equals_owned_and_is_reused() -> None:
    """The scratch-buffer path (used by the training matmul) decodes the same values; a later call
    reuses the buffer, which is why only a caller that is done with the weight may ask for it."""
    first, second = quantize_nf4(weights((96, 64), seed=1)), quantize_nf4(weights((33, 17), seed=2))
    owned_first, owned_second = first.dequantize(), second.dequantize()
    scratch_first = first.dequantize(workspace=True)
    torch.testing.assert_close(scratch_first, owned_first, rtol=0, atol=0)
    scratch_second = second.dequantize(workspace=True)
    torch.testing.assert_close(scratch_second, owned_second, rtol=0, atol=0)
    assert scratch_second.untyped_storage().data_ptr() == scratch_first.untyped_storage().data_ptr()
    assert first.dequantize().untyped_storage().data_ptr() != scratch_first.untyped_storage().data_ptr()
    torch.testing.assert_close(first.dequantize(torch.bfloat16, workspace=True), owned_first.bfloat16(), rtol=0, atol=0)


def test_bits_per_parameter_measured_from_the_stored_tensors() -> None:
    weight = weights((688, 256))  # tiny-llama's MLP projection: 2752 blocks of 64
    plain = quantize_nf4(weight, double_quant=False)
    double = quantize_nf4(weight, double_quant=True)
    assert plain.bits_per_parameter == pytest.approx(4 + 32 / 64)  # 4.5
    assert double.bits_per_parameter <= 4.13  # 4 + 8/64 + 32/(64·256) + the offset and a partial block
    assert double.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-3)
    assert double.nbytes == sum(t.numel() * t.element_size() for t in double.tensors().values())
    expected = {"packed": (88064,), "absmax": (2752,), "absmax_scale": (11,), "absmax_offset": ()}
    assert {name: tuple(t.shape) for name, t in double.tensors().items()} == expected
    shell = empty_nf4(weight.shape, weight.dtype)
    assert {name: t.shape for name, t in shell.tensors().items()} == \
        {name: t.shape for name, t in double.tensors().items()}


def test_double_quantization_error_is_small_relative_to_nf4_error() -> None:
    weight = weights((256, 256), seed=3)
    plain, double = quantize_nf4(weight, double_quant=False), quantize_nf4(weight)
    assert torch.equal(plain.packed, double.packed)  # the 4-bit codes do not depend on it
    relative = ((double.block_scales() - plain.absmax) / plain.absmax).abs()
    assert relative.max() < 0.01  # 8-bit constants: under 1% error on each block's scale
    nf4_error = (plain.dequantize() - weight).pow(2).mean()
    assert (double.dequantize() - weight).pow(2).mean() < 1.05 * nf4_error


@pytest.mark.parametrize("blocksize", [0, 48, 8192])
def test_unsupported_blocksize_is_a_config_error(blocksize: int) -> None:
    with pytest.raises(ConfigError, match="blocksize"):
        quantize_nf4(weights((4, 64)), blocksize=blocksize)


def test_integer_weight_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="floating-point"):
        quantize_nf4(torch.ones(64, dtype=torch.int64))


# ------------------------------------------------------------------------------------ bitsandbytes


def test_dynamic_codebook_equals_bitsandbytes(bnb_functional) -> None:
    assert torch.equal(dynamic_codebook(), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", ALIGNED_SHAPES + RAGGED_SHAPES)
def test_codes_identical_to_bitsandbytes_without_double_quant(bnb_functional, shape) -> None:
    weight = weights(shape, seed=sum(shape))
    packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=False)
    ours = quantize_nf4(weight, blocksize=64, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)


@pytest.mark.parametrize("shape", ALIGNED_SHAPES)
def test_dequantized_equals_bitsandbytes_dequantize_4bit(bnb_functional, shape) -> None:
    weight = weights(shape, seed=sum(shape))
    packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=False)
    reference = bnb_functional.dequantize_4bit(packed, state)
    assert (quantize_nf4(weight, double_quant=False).dequantize() - reference).abs().max() <= 1e-6


@pytest.mark.parametrize("shape", RAGGED_SHAPES)
def test_dequantized_equals_bitsandbytes_reference_kernel_on_ragged_shapes(bnb_functional, shape) -> None:
    """bitsandbytes 0.50.2's *CPU* ``dequantize_4bit`` kernel assumes blocks do not cross rows: for a
    weight whose rows are not a multiple of the blocksize (e.g. 256 x 688) it decodes with the wrong
    block constants (errors ~0.05 on N(0, 0.02) weights) although its own quantize_4bit blocks the
    flat tensor. Its pure-PyTorch backend (the same layout) is the reference here."""
    ops = pytest.importorskip("bitsandbytes.backends.default.ops", reason="bitsandbytes' default backend moved")
    weight = weights(shape, seed=sum(shape))
    packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=False)
    decode = getattr(ops._dequantize_4bit_compute, "__wrapped__", ops._dequantize_4bit_compute)  # eager, no compile
    reference = decode(packed.view(-1), state.absmax, state.code, 64, shape, torch.float32)
    assert (quantize_nf4(weight, double_quant=False).dequantize() - reference).abs().max() <= 1e-6


@pytest.mark.parametrize("shape", ALIGNED_SHAPES)
def test_double_quant_within_measured_tolerance_of_bitsandbytes(bnb_functional, shape) -> None:
    """Same 4-bit codes, same offset and second-level scales; bitsandbytes' C kernel rounds ~0.2% of the
    8-bit absmax codes one step differently, so dequantized weights differ by ≤ 1.5% of the block absmax."""
    weight = weights(shape, seed=sum(shape), scale=1.0)
    packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=True)
    ours = quantize_nf4(weight, blocksize=64, double_quant=True)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax_offset, state.offset) and torch.equal(ours.absmax_scale, state.state2.absmax)
    code_steps = (ours.absmax.int() - state.absmax.int()).abs()
    assert code_steps.max() <= 1 and (code_steps == 0).float().mean() >= 0.99
    reference = bnb_functional.dequantize_4bit(packed, state)
    block_absmax = weight.view(-1, 64).abs().max(dim=1).values
    difference = (ours.dequantize() - reference).view(-1, 64).abs().max(dim=1).values
    assert bool((difference <= DOUBLE_QUANT_TOLERANCE * block_absmax).all())
