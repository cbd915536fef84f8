"""4-bit NormalFloat (NF4) with blockwise absmax and double quantization (QLoRA, arXiv:2305.14314).

The idea (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3):
pretrained weights are roughly normal, so a 4-bit code whose 16 values are *quantiles of N(0, 1)*
spends its levels where the weights are. Each block of ``blocksize`` consecutive weights is scaled
into [-1, 1] by its absolute maximum ``c`` and every weight is stored as the index of the nearest
code value:

    q_i = argmin_k | W_i / c_b - NF4_k |            W_i ≈ c_b * NF4[q_i]      (i in block b)

NF4 codebook (the paper's eq. 4, asymmetric so that 0 is exact): 8 positive values from the
quantiles ``Φ⁻¹(linspace(δ, 1/2, 9))``, 7 negative ones from ``-Φ⁻¹(linspace(δ, 1/2, 8))``, plus 0,
normalised by the largest, with δ = 0.9677083 (the mean of 1 - 1/(2·15) and 1 - 1/(2·16)).

Double quantization (section 3, "Double Quantization"): the float32 block constants ``c`` cost
32/64 = 0.5 bit per weight. They are centred by their mean and quantized again, in blocks of 256,
with the signed 8-bit dynamic code of Dettmers (2016, arXiv:1511.04561), keeping one float32 scale
per 256 constants:

    bits / weight = 4 + 32/64                    = 4.5       (double_quant=False)
                  = 4 + 8/64 + 32/(64·256)       ≈ 4.127     (double_quant=True)

How the code maps to it: :func:`nf4_codebook` computes the 16 values from the normal quantiles
(bit-identical to bitsandbytes' table); :func:`quantize_nf4` flattens the weight row-major, computes
the block absmax, rounds with ``bucketize`` against the midpoints of the codebook (ties go to the
lower code, as bitsandbytes) and packs two codes per byte, the first in the high nibble. With
``double_quant`` the absmax vector goes through :func:`_quantize_blockwise_8bit`. The result is an
:class:`NF4Tensor`; ``dequantize()`` decodes a byte into its two code values with one 256-entry
table lookup and multiplies by the block constants in place. Training dequantizes every targeted
weight twice per step (forward and backward, like bitsandbytes) into a reused per-thread scratch
buffer, so the full-precision weights never accumulate and no step allocates weight-sized memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from functools import cache

import torch

from tunelab.errors import ConfigError

NF4_OFFSET = 0.9677083  # δ: (1 - 1/30 + 1 - 1/32) / 2, the paper's outermost quantile
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' supported blocksizes
ABSMAX_BLOCKSIZE = 256  # double quantization: blocks of 256 constants (the paper)
_TINY = 1e-38  # an all-zero block has absmax 0; divide by this instead (its codes are all "0.0")


@cache
def _codebook(name: str) -> torch.Tensor:
    return nf4_codebook(NF4_OFFSET) if name == "nf4" else dynamic_codebook()


def nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values (sorted, float32): normal quantiles normalised to [-1, 1], 0 exact."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values < 0
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return values / values.max()  # (16,), normalised in float32 (as bitsandbytes built its table)


def dynamic_codebook() -> torch.Tensor:
    """The signed 8-bit dynamic code (256 sorted float32 values in [-1, 1]) for the absmax constants.

    A sign bit, then for exponent e = 0..6 a linear fraction of 2**e values on [0.1, 1] scaled by
    10**(e - 6); plus 0 and 1. Built as bitsandbytes' ``create_dynamic_map(signed=True)``.
    """
    values: list[float] = []
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # 2**exponent fraction values
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


@cache
def _pair_table(device: torch.device) -> torch.Tensor:
    """Byte -> its two NF4 values, as one float64 word per byte (so one lookup decodes two codes)."""
    code = _codebook("nf4").to(device)
    byte = torch.arange(256, device=device)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=-1)  # (256, 2) float32: high, low nibble
    return pairs.view(torch.float64).view(256)  # (256,) reinterpretation, no rounding


_SCRATCH = threading.local()  # per-thread reusable buffers for dequantize(workspace=True)


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``(numel,)`` view of a per-thread buffer that only grows (largest layer seen so far)."""
    key = (name, dtype, device)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


@dataclass(eq=False)
class NF4Tensor:
    """A weight stored as packed NF4 codes plus its (possibly double-quantized) block constants.

    Attributes:
        packed: ``(ceil(n / 2),)`` uint8, two codes per byte, the first in the high nibble.
        absmax: ``(n_blocks,)`` float32 block constants, or their uint8 codes with double quantization.
        absmax_scale: ``(ceil(n_blocks / 256),)`` float32 second-level absmax (double quantization only).
        absmax_offset: ``()`` float32 mean subtracted from the constants (double quantization only).
        shape: the original shape; ``dtype``: the original dtype (``dequantize()`` returns it).
        blocksize: weights per block.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def numel(self) -> int:
        return self.shape.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (what a state dict or a checkpoint holds)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (codes, constants, second-level scales and offset)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes / self.numel()

    def block_scales(self) -> torch.Tensor:
        """The float32 block constants ``c`` (decoded from 8 bits with double quantization)."""
        if not self.double_quant:
            return self.absmax
        centred = _dequantize_blockwise_8bit(self.absmax, self.absmax_scale, ABSMAX_BLOCKSIZE)
        return centred + self.absmax_offset  # (n_blocks,)

    def codes(self) -> torch.Tensor:
        """The unpacked 4-bit codes, ``(n,)`` uint8 in 0..15 (row-major order of the weight)."""
        return torch.stack([self.packed >> 4, self.packed & 15], dim=-1).view(-1)[: self.numel()]

    def dequantize(self, dtype: torch.dtype | None = None, workspace: bool = False) -> torch.Tensor:
        """``c_b * NF4[q_i]`` in the original shape, as ``dtype`` (default: the original dtype).

        One table lookup writes both codes of a byte as one float64 word, then the block constants
        multiply in place: two passes and one ``(n,)`` allocation. With ``workspace=True`` the float32
        result lives in a per-thread scratch buffer reused by the next call (no allocation, no page
        faults): only for a caller that is done with it before dequantizing again (the matmul below).
        """
        blocksize, n_pairs = self.blocksize, self.packed.numel()
        scales = self.block_scales()  # (n_blocks,)
        padded = scales.numel() * blocksize  # >= numel, even (blocksizes are even)
        table = _pair_table(self.packed.device)
        if workspace:
            words = _scratch("words", padded // 2, torch.float64, self.packed.device)
            index = _scratch("index", n_pairs, torch.int32, self.packed.device).copy_(self.packed)
        else:
            words = torch.empty(padded // 2, dtype=torch.float64, device=self.packed.device)
            index = self.packed.int()
        torch.index_select(table, 0, index, out=words[:n_pairs])
        values = words.view(torch.float32)  # (padded,)
        values[2 * n_pairs:].zero_()  # padding of the last block, if any
        values.view(-1, blocksize).mul_(scales[:, None])
        weight = values[: self.numel()].view(self.shape)
        target = dtype or self.dtype
        return weight if target == torch.float32 else weight.to(target)

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy on ``device`` (the codes never change dtype)."""
        moved = {name: tensor.to(device) for name, tensor in self.tensors().items()}
        return NF4Tensor(**{**self.__dict__, **moved})


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ConfigError(f"NF4 blocksize {blocksize!r} is not supported; use one of {', '.join(map(str, BLOCKSIZES))}")


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(absmax (n_blocks,), flat / absmax clamped to [-1, 1] (n,))``, with bitsandbytes' exact arithmetic."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().max(dim=-1).values
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=_TINY)[:, None]), -1, 1).view(-1)
    if full < n:  # the last, partial block (bitsandbytes divides here instead of multiplying)
        tail_absmax = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return absmax, scaled


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (a tie goes to the lower one), as uint8."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints.to(scaled.device), out_int32=True).to(torch.uint8)


def _quantize_blockwise_8bit(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-code blockwise quantization: ``(codes (n,) uint8, absmax (n_blocks,) float32)``."""
    absmax, scaled = _scale_blocks(values.float().reshape(-1), blocksize)
    return _nearest(scaled, _codebook("dynamic")), absmax


def _dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    values = _codebook("dynamic").to(codes.device)[codes.long()]  # (n,)
    padded = absmax.numel() * blocksize
    values = torch.nn.functional.pad(values, (0, padded - values.numel()))
    return (values.view(-1, blocksize) * absmax[:, None]).view(-1)[: codes.numel()]


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize ``weight`` (any shape, float) to NF4 in blocks of ``blocksize`` consecutive values.

    Args:
        weight: a floating-point tensor; blocks run over its row-major flattening (``(out, in)`` for a
            Linear weight, as bitsandbytes).
        blocksize: weights per absmax block (64 in the paper).
        double_quant: also quantize the block constants (8-bit, blocks of 256), saving ~0.37 bit/weight.

    Returns:
        An :class:`NF4Tensor`; ``.dequantize()`` gives the approximation, ``.nbytes`` its storage.
    """
    _check_blocksize(blocksize)
    if not weight.is_floating_point():
        raise ConfigError(f"quantize_nf4 needs a floating-point weight, got {weight.dtype}; pass the float weight")
    if weight.numel() == 0:
        raise ConfigError("quantize_nf4 got an empty weight; quantize a tensor with at least one element")
    absmax, scaled = _scale_blocks(weight.detach().float().reshape(-1), blocksize)
    codes = _nearest(scaled, _codebook("nf4"))  # (n,) uint8 in 0..15
    if codes.numel() % 2:
        codes = torch.cat([codes, _nearest(scaled.new_zeros(1), _codebook("nf4"))])  # pad with the code of 0
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n / 2),) first code in the high nibble
    scale = offset = None
    if double_quant:
        offset = absmax.mean()
        absmax, scale = _quantize_blockwise_8bit(absmax - offset, ABSMAX_BLOCKSIZE)
    return NF4Tensor(packed=packed, absmax=absmax, absmax_scale=scale, absmax_offset=offset,
                     shape=weight.shape, dtype=weight.dtype, blocksize=blocksize)


def empty_nf4(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, blocksize: int = 64,
              double_quant: bool = True, device: torch.device | str | None = None) -> NF4Tensor:
    """An uninitialised :class:`NF4Tensor` of the right storage sizes (a shell to load a checkpoint into)."""
    _check_blocksize(blocksize)
    n = torch.Size(shape).numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    if not double_quant:
        return NF4Tensor(packed, torch.empty(n_blocks, device=device), None, None, torch.Size(shape), dtype, blocksize)
    return NF4Tensor(packed, torch.empty(n_blocks, dtype=torch.uint8, device=device),
                     torch.empty(-(-n_blocks // ABSMAX_BLOCKSIZE), device=device), torch.empty((), device=device),
                     torch.Size(shape), dtype, blocksize)


# ------------------------------------------------------------------------------------ the 4-bit layer

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FIELDS = ("absmax", "absmax_scale", "absmax_offset")  # NF4Tensor fields stored as ``weight_<field>``


class _DequantizedMatmul(torch.autograd.Function):
    """``x Ŵᵀ`` that keeps only the 4-bit weight for backward and dequantizes it again there.

    Saving the dequantized ``Ŵ`` (what ``F.linear`` would do) keeps every layer's full-precision
    weight alive until backward, i.e. the memory QLoRA exists to save. ``x`` is not saved either: the
    frozen weight needs no gradient, only the input does (``dL/dx = dL/dy Ŵ``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.dense_weight(x.dtype, workspace=True))  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None  # e.g. the first layer: its input comes from a frozen embedding
        return grad @ ctx.layer.dense_weight(grad.dtype, workspace=True), None  # (..., out) @ (out, in)


class NF4Linear(torch.nn.Module):
    """A frozen linear layer with an NF4 weight: ``y = x Ŵᵀ + b``, ``Ŵ`` dequantized per call.

    Buffers: ``weight`` (packed codes, uint8, like bitsandbytes' ``Params4bit``), ``weight_absmax``
    and, with double quantization, ``weight_absmax_scale`` / ``weight_absmax_offset``; ``bias`` stays
    a (frozen) parameter in full precision. Matmuls run in ``compute_dtype``; the output returns in
    the input's dtype. ``merged_weight`` (not saved) holds a full-precision weight while a LoRA delta
    is merged; then it replaces the codes in ``forward``.
    """

    def __init__(self, quantized: NF4Tensor, bias: torch.Tensor | None, compute_dtype: str = "float32",
                 source: str = "linear") -> None:
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype {compute_dtype!r} is not supported; use one of {', '.join(COMPUTE_DTYPES)}")
        self.out_features, self.in_features = quantized.shape
        self.blocksize, self.double_quant = quantized.blocksize, quantized.double_quant
        self.original_dtype, self.compute_dtype, self.source = quantized.dtype, compute_dtype, source
        self.register_buffer("weight", quantized.packed)
        for name in _FIELDS:
            self.register_buffer(f"weight_{name}", getattr(quantized, name))
        if bias is not None and not isinstance(bias, torch.nn.Parameter):
            bias = torch.nn.Parameter(bias, requires_grad=False)
        self.bias = None if bias is None else bias.requires_grad_(False)  # the original parameter, kept as is
        self.register_buffer("merged_weight", None, persistent=False)

    @classmethod
    def from_module(cls, module: torch.nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: str = "float32") -> NF4Linear:
        """Quantize an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose ``(in, out)`` weight is transposed first)."""
        source = "conv1d" if type(module).__name__ == "Conv1D" else "linear"
        weight = module.weight.T if source == "conv1d" else module.weight  # (out, in)
        quantized = quantize_nf4(weight.contiguous(), blocksize, double_quant)
        return cls(quantized, module.bias, compute_dtype, source)

    @property
    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.weight, self.weight_absmax, self.weight_absmax_scale, self.weight_absmax_offset,
                         torch.Size((self.out_features, self.in_features)), self.original_dtype, self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes of the 4-bit weight's storage (the bias is counted with the other float parameters)."""
        return self.quantized.nbytes

    def dense_weight(self, dtype: torch.dtype | None = None, workspace: bool = False) -> torch.Tensor:
        """The ``(out, in)`` weight in full precision: the merged one if set, else dequantized codes.

        ``workspace=True``: the result may be a scratch buffer overwritten by the next call (see
        :meth:`NF4Tensor.dequantize`); the matmul uses it, anything that keeps the weight must not.
        """
        dtype = dtype or COMPUTE_DTYPES[self.compute_dtype]
        if self.merged_weight is not None:
            return self.merged_weight.to(dtype)
        return self.quantized.dequantize(dtype, workspace=workspace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = COMPUTE_DTYPES[self.compute_dtype]
        result = _DequantizedMatmul.apply(x.to(compute), self)  # (..., out)
        if self.bias is not None:
            result = result + self.bias.to(compute)
        return result.to(x.dtype)

    def to_dense_module(self) -> torch.nn.Module:
        """A plain ``nn.Linear`` / ``Conv1D`` (original type and dtype) holding the dense weight, frozen."""
        weight = self.dense_weight(self.original_dtype)  # (out, in)
        if self.source == "conv1d":
            from transformers.pytorch_utils import Conv1D

            module = Conv1D(self.out_features, self.in_features)
            weight = weight.T  # Conv1D stores (in, out)
        else:
            module = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        module = module.to(device=weight.device, dtype=self.original_dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module.requires_grad_(False)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool, dtype: torch.dtype, blocksize: int,
              double_quant: bool, compute_dtype: str, source: str) -> NF4Linear:
        """A shell with storage of the right sizes, for loading a quantized checkpoint into."""
        shell = empty_nf4((out_features, in_features), dtype, blocksize, double_quant)
        return cls(shell, torch.empty(out_features, dtype=dtype) if bias else None, compute_dtype, source)

    def spec(self) -> dict:
        """What :meth:`empty` needs to rebuild this layer (stored in a quantized checkpoint's json)."""
        return {"out_features": self.out_features, "in_features": self.in_features, "bias": self.bias is not None,
                "dtype": str(self.original_dtype).removeprefix("torch."), "blocksize": self.blocksize,
                "double_quant": self.double_quant, "compute_dtype": self.compute_dtype, "source": self.source}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")
