"""tunelab.quant: weight quantization for memory-efficient fine-tuning.

    from tunelab.quant import quantize_nf4
    q = quantize_nf4(weight, blocksize=64, double_quant=True)   # NF4 + double quantization (QLoRA)
    q.dequantize(), q.nbytes, q.bits_per_parameter

``NF4Linear`` is the frozen 4-bit linear layer that QLoRA (``tunelab.tuners.lora.qlora``) puts under
its LoRA adapters. See docs/methods/qlora.md.
"""

from tunelab.quant.nf4 import (
    NF4Linear,
    NF4Tensor,
    dynamic_codebook,
    empty_nf4,
    nf4_codebook,
    quantize_nf4,
)

__all__ = ["NF4Linear", "NF4Tensor", "dynamic_codebook", "empty_nf4", "nf4_codebook", "quantize_nf4"]
