"""Memory and time of a fine-tuning run on paper: ``estimate_memory(model, method, ...) -> GiB`` per GPU.

The idea: GPU memory is a sum of a few terms, each a count times bytes, so the table in
``docs/scale.md`` can be recomputed (and checked against published numbers) instead of guessed::

    memory = weights + adapter (weights, gradients, AdamW moments) + activations + logits
    weights      = quantized linear params x 4.127/8 bytes (NF4 + double quant, QLoRA §3)
                   + the rest (embeddings, head, norms) x 2 bytes (bf16)        -- qlora
                 = all params x 2 bytes (bf16)                                   -- lora
                 = all params x 16 bytes (bf16 weights + bf16 grads + fp32 master + 2 fp32 moments)
                                                                                 -- full (mixed precision)
    adapter      = trainable x (4 + 4 + 8) bytes  (fp32 weights, gradients, AdamW m and v; 2 + 2 + 8
                   with bf16 adapters as in the QLoRA paper)
    activations  = with gradient checkpointing: layers x b·s·h x 2 bytes (each layer's input kept)
                   + one layer's recomputed activations 34·b·s·h bytes (Korthikanti et al. 2022,
                   "Reducing Activation Recomputation in Large Transformer Models", eq. 1 with
                   flash attention: no b·a·s² score matrices); without checkpointing layers x 34·b·s·h
    logits       = b·s·vocab x 4 bytes x 2 (fp32 logits and their gradient for the cross entropy)

Sharding (FSDP / DeepSpeed ZeRO-3) divides weights and adapter state by the number of GPUs; ZeRO-2
divides only gradients and optimizer moments. Time: ``6·N·tokens`` FLOPs for full fine-tuning
(forward 2N, backward 4N), ``4·N`` for adapters (no weight gradients of the frozen base) plus ``2·N``
for the recomputed forward under checkpointing (Kaplan et al. 2020's 6N rule), at a stated model
FLOPs utilisation of the GPU's dense bf16 peak.

Reference points (checked in tests/test_estimate.py): QLoRA (Dettmers et al. 2023, arXiv:2305.14314)
fine-tunes LLaMA-65B on one 48 GB GPU; LLaMA-Factory's hardware table lists 16 GB for 16-bit LoRA at
7B, 6 GB / 48 GB for 4-bit QLoRA at 7B / 70B, and 120 GB for mixed-precision full fine-tuning at 7B.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.errors import ConfigError

GIB = 2**30
NF4_BYTES = 4.127 / 8  # NF4 + double quantization: 4 + 8/64 + 32/(64·256) bits per weight (blocksize 64)
METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only transformer (Llama layout: q, k, v, o, gate, up, down)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_hidden: int  # k/v projection width: hidden for MHA, hidden * kv_heads / heads with GQA
    tied: bool = False  # LM head shares the embedding matrix

    @property
    def linear_params(self) -> int:
        """Parameters of the projections in all layers (what LoRA targets and QLoRA quantizes)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_hidden
        return self.layers * (2 * h * h + 2 * h * kv + 3 * h * i)

    @property
    def other_params(self) -> int:
        """Embeddings, LM head (unless tied) and norms: kept in bf16 by QLoRA."""
        return (1 if self.tied else 2) * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int) -> int:
        """LoRA on every linear layer ("all-linear", as QLoRA does): r·(d_in + d_out) per matrix."""
        h, i, kv = self.hidden, self.intermediate, self.kv_hidden
        return self.layers * r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))


# Llama shapes of the sizes the docs discuss (published configs)
MODELS = {
    "llama-3.2-1b": ModelShape("llama-3.2-1b", 16, 2048, 8192, 128256, 512, tied=True),
    "llama-7b": ModelShape("llama-7b", 32, 4096, 11008, 32000, 4096),
    "llama-65b": ModelShape("llama-65b", 80, 8192, 22016, 32000, 8192),
    "llama-2-70b": ModelShape("llama-2-70b", 80, 8192, 28672, 32000, 1024),
}


@dataclass(frozen=True)
class Estimate:
    """GiB per GPU, by term."""

    weights: float
    adapter: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.activations + self.logits


def estimate_memory(model: ModelShape | str, method: str, *, batch: int = 1, seq: int = 512, r: int = 64,
                    checkpointing: bool = True, gpus: int = 1, sharding: str = "none",
                    adapter_bytes: int = 4) -> Estimate:
    """Peak GPU memory of one training step, per GPU.

    Args:
        model: a :class:`ModelShape` or a key of :data:`MODELS`.
        method: ``full`` (bf16 mixed precision, AdamW), ``lora`` (bf16 base) or ``qlora`` (NF4 base).
        batch, seq: micro-batch per GPU and sequence length.
        r: LoRA rank (all linear layers).
        adapter_bytes: bytes per adapter weight and gradient: 4 (fp32, tunelab's default under autocast)
            or 2 (bf16 adapters, the QLoRA paper's setting); AdamW's moments stay fp32.
        checkpointing: gradient checkpointing (one layer's activations live at a time).
        gpus, sharding: ``none`` (DDP: every GPU holds everything), ``zero2`` (gradients and optimizer
            moments split over ``gpus``), ``fsdp`` (= ZeRO-3: weights too).
    """
    shape = MODELS[model] if isinstance(model, str) else model
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} for the estimate; choose one of {', '.join(METHODS)}")
    if sharding not in ("none", "zero2", "fsdp"):
        raise ConfigError(f"unknown sharding {sharding!r}; choose none, zero2 or fsdp")
    if method == "full":
        weights, trainable = shape.params * 2.0, shape.params
        state = trainable * (2 + 4 + 8)  # bf16 grads, fp32 master copy, AdamW m and v
    else:
        base = shape.linear_params * (NF4_BYTES if method == "qlora" else 2.0)
        weights, trainable = base + shape.other_params * 2.0, shape.lora_params(r)
        weights += trainable * adapter_bytes
        state = trainable * (adapter_bytes + 8)  # gradients, AdamW m and v (fp32)
    split = max(1, gpus)
    if sharding == "fsdp":
        weights, state = weights / split, state / split
    elif sharding == "zero2":
        state = state / split
    tokens_hidden = batch * seq * shape.hidden
    per_layer = 34 * tokens_hidden  # bytes, bf16, flash attention
    activations = shape.layers * 2 * tokens_hidden + per_layer if checkpointing else shape.layers * per_layer
    logits = batch * seq * shape.vocab * 4 * 2
    return Estimate(weights / GIB, state / GIB, activations / GIB, logits / GIB)


def train_hours(model: ModelShape | str, method: str, tokens: float, *, gpus: int = 1, peak_tflops: float = 312.0,
                mfu: float = 0.4, checkpointing: bool = True) -> float:
    """Wall-clock hours to train on ``tokens`` tokens (A100 bf16 peak 312 TFLOPS, 40% utilisation by default)."""
    shape = MODELS[model] if isinstance(model, str) else model
    per_token = 6.0 if method == "full" else 4.0  # adapters: no weight gradients for the frozen base
    if checkpointing:
        per_token += 2.0  # the forward pass again, during backward
    flops = per_token * shape.params * tokens
    return flops / (gpus * peak_tflops * 1e12 * mfu) / 3600.0
