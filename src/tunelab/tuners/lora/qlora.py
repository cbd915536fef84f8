"""QLoRA: LoRA on a frozen 4-bit NF4 base (Dettmers et al. 2023, arXiv:2305.14314).

The idea: the frozen base weights dominate fine-tuning memory, and they never receive a gradient, so
store them in 4 bits (NF4 with double quantization, ``tunelab.quant.nf4``) and train only LoRA
adapters in full precision on top. The forward pass dequantizes each weight just in time:

    h = dequant(W_NF4) x + s B A dropout(x)          dequant(W_NF4)_i = c_b * NF4[q_i]

Gradients flow through the dequantized weight to ``x`` (never to the codes), so ``A`` and ``B`` learn
exactly as LoRA's would over the quantized model. Memory for the weights: 4.127 instead of 32
bits per parameter for every quantized layer.

How the code maps to it: :func:`quantize_model` replaces each target ``nn.Linear`` / ``Conv1D`` by a
:class:`~tunelab.quant.nf4.NF4Linear` (default targets: every linear layer but the output head and a
classification head, the paper's "all linear layers"); :func:`inject` then adds LoRA with
:class:`QLoraLayer`, a ``LoraLayer`` whose ``get_base_weight`` / ``set_base_weight`` read and write the
4-bit layer. Only the adapter is saved (``tuners.save``); the quantized base can be saved and loaded
on its own (:func:`save_quantized`, :func:`load_quantized`), e.g. onto a model built on the meta device.

Merge semantics (choice): merging a LoRA delta into a 4-bit weight and re-quantizing (HF PEFT's
behaviour) is lossy, and unmerging cannot restore the original codes. tunelab merges into the
*dequantized* weight instead: while merged, a layer holds ``dequant(W) + s B A`` in full precision
(exact: merged outputs equal unmerged ones up to float rounding); ``unmerge`` drops it and the
original codes are back bit for bit. ``tuners.unload`` returns plain ``nn.Linear``/``Conv1D`` layers
with the dequantized (merge=False) or merged (merge=True) weights, in the original dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import MethodError, ModelError
from tunelab.quant.nf4 import BLOCKSIZES, NF4Linear
from tunelab.tuners import targets
from tunelab.tuners.base import BaseTunerLayer, get_state
from tunelab.tuners.lora import lora
from tunelab.tuners.lora.dora import DoraVariant
from tunelab.utils import atomic_path, atomic_write_json

QUANT_CONFIG = "tunelab_quantized.json"
QUANT_WEIGHTS = "model.safetensors"
QUANTIZABLE_TYPES = targets.LINEAR_TYPES  # nn.Linear and GPT-2's Conv1D


class QLoraConfig(lora.LoraConfig):
    """LoRA's options plus how the base is quantized (bitsandbytes' names in parentheses)."""

    method = "qlora"

    target_modules: list[str] | str | None = "all-linear"
    """Modules to quantize and adapt; default every linear layer but the output/classifier head."""
    blocksize: int = 64
    """Weights per absmax block (64 in the paper)."""
    double_quant: bool = True
    """Quantize the block constants too, 8-bit in blocks of 256 (bnb_4bit_use_double_quant)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the dequantized weight and the base matmul (bnb_4bit_compute_dtype)."""
    gradient_checkpointing: bool = False
    """Recompute transformer blocks in backward instead of storing activations (HF models only)."""

    @field_validator("blocksize")
    @classmethod
    def _known_blocksize(cls, value: int) -> int:
        if value not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}")
        return value


class QLoraLayer(lora.LoraLayer):
    """LoRA over an :class:`NF4Linear` base; merges go into a full-precision copy (see module docstring)."""

    stackable = False  # another method's layer around it would merge into, or read, the 4-bit codes

    def get_base_weight(self) -> torch.Tensor:
        return self.base_layer.dense_weight(torch.float32)  # (out, in), dequantized or merged

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self.base_layer.merged_weight = weight.float()  # the 4-bit codes stay untouched

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self.base_layer.merged_weight = None  # exact: back to the stored codes, no float drift

    def unload(self, merge: bool) -> nn.Module:
        base = super().unload(merge)  # merges or unmerges, returns the NF4Linear
        return base.to_dense_module()


def quantize_model(model: nn.Module, target_modules: list[str] | str = "all-linear", blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: str = "float32") -> list[str]:
    """Replace each target ``nn.Linear`` / ``Conv1D`` of ``model`` by an :class:`NF4Linear`, in place.

    Already-quantized targets are kept as they are. Returns the quantized paths.
    """
    targets.check_regex(target_modules)
    paths = targets.find_targets(model, target_modules, (*QUANTIZABLE_TYPES, NF4Linear))
    modules = {path: model.get_submodule(path) for path in paths}
    for path, module in modules.items():
        if isinstance(module, BaseTunerLayer) and not isinstance(module, QLoraLayer):
            raise MethodError(f"module {path!r} is already wrapped by {type(module).__name__} over a full-precision "
                              "weight; apply qlora to a fresh model or call tuners.unload(model) first")
    for path, module in modules.items():
        if isinstance(module, QUANTIZABLE_TYPES):
            targets.replace_module(model, path, NF4Linear.from_module(module, blocksize, double_quant, compute_dtype))
    return paths


def _check_layers(model: nn.Module, paths: list[str], config: QLoraConfig) -> None:
    for path in paths:
        layer = targets.base_of(model.get_submodule(path))
        if (layer.blocksize, layer.double_quant) != (config.blocksize, config.double_quant):
            raise MethodError(f"{path!r} is already quantized with blocksize={layer.blocksize}, "
                              f"double_quant={layer.double_quant}; pass the same values or use a fresh model")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing of a transformers model (non-reentrant: adapters get gradients)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise MethodError(f"{type(model).__name__} does not support gradient checkpointing; "
                          "pass gradient_checkpointing=False")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def inject(model: nn.Module, config: QLoraConfig, adapter_name: str) -> list[str]:
    """Quantize the targets (unless they already are), then add LoRA adapter ``adapter_name`` on top."""
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.target_modules is None:
        config.target_modules = targets.ALL_LINEAR
    paths = quantize_model(model, config.target_modules, config.blocksize, config.double_quant, config.compute_dtype)
    _check_layers(model, paths, config)
    variant_factory = DoraVariant if config.use_dora else None  # QDoRA: PEFT's use_dora on a 4-bit base
    return lora.inject(model, config, adapter_name, layer_class=QLoraLayer, linear_types=(NF4Linear,),
                       variant_factory=variant_factory)


# ------------------------------------------------------------------------------- quantized checkpoints


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a quantized model without adapters: its state dict (4-bit codes included) and a layer map.

    ``path/model.safetensors`` holds the state dict (tied tensors once), ``path/tunelab_quantized.json``
    the :class:`NF4Linear` layers with what :func:`load_quantized` needs to rebuild them.
    """
    if get_state(model) is not None:
        raise MethodError("the model has adapters; save them with tuners.save and the base before tuners.apply "
                          "(or after tuners.unload)")
    layers = {name: module.spec() for name, module in model.named_modules() if isinstance(module, NF4Linear)}
    if not layers:
        raise MethodError("the model has no NF4 layers; call tunelab.tuners.lora.qlora.quantize_model(model) first")
    tensors, seen = {}, set()
    for key, tensor in model.state_dict().items():
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if tensor.numel() and pointer in seen:
            continue  # tied weights (e.g. GPT-2's lm_head = wte): stored once, re-tied on load
        seen.add(pointer)
        tensors[key] = tensor.detach().cpu().contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / QUANT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "tunelab-nf4"})
    atomic_write_json(path / QUANT_CONFIG, {"format": "tunelab-nf4", "version": 1,
                                            "model_class": type(model).__name__, "layers": layers})
    return path


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint of :func:`save_quantized` into ``model`` (same architecture), in place.

    ``model`` is a freshly built model of the same architecture; every tensor is *assigned* from the
    file, so its random weights are released as they are replaced. A model built on the meta device
    (``with torch.device("meta"): ...``) works when it has no computed buffers (Llama's rotary
    ``inv_freq`` is one; build such models on the CPU).
    """
    path = Path(path)
    try:
        record = json.loads((path / QUANT_CONFIG).read_text(encoding="utf-8"))
        state = load_file(str(path / QUANT_WEIGHTS))
    except (OSError, ValueError) as error:
        raise ModelError(f"no readable quantized checkpoint in {path} ({type(error).__name__}); "
                         "write one with tunelab.tuners.lora.qlora.save_quantized") from None
    for name, spec in record["layers"].items():
        spec = {**spec, "dtype": getattr(torch, spec["dtype"])}
        try:
            targets.replace_module(model, name, NF4Linear.empty(**spec))
        except AttributeError:
            raise ModelError(f"the checkpoint quantizes {name!r}, which this {type(model).__name__} lacks; "
                             f"load it into a {record.get('model_class')}") from None
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ModelError(f"checkpoint key {result.unexpected_keys[0]!r} does not fit this model; "
                         f"load it into a {record.get('model_class')}")
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if empty:
        raise ModelError(f"{empty[0]!r} is still on the meta device (not in the checkpoint); build the model "
                         "on the CPU before load_quantized, or save the checkpoint again with save_quantized")
    return model.requires_grad_(False)
