"""Full fine-tuning: every parameter trains. The baseline every PEFT method is measured against.

    theta <- theta - lr * update(grad L(theta))      for all parameters theta

It is a registered method so that one experiment config can compare it with the rest: ``apply``
unfreezes everything, ``trainable_parameters`` lists every parameter, and ``save`` writes the whole
state dict (safetensors; tied weights such as GPT-2's ``lm_head``/``wte`` stored once).

Choice, documented in docs/methods/full.md: no copy of the base weights is kept (it would double the
memory of the largest models), so the base behaviour is gone once training starts. Therefore
``disabled()`` and ``set_active([])`` raise a MethodError, full fine-tuning cannot share a model with
other adapters, merge/unmerge are no-ops (nothing to fold) and ``unload`` returns the model as trained.
Deep-copy the model before ``apply`` when a frozen reference is needed (DPO, distillation).
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.tuners.base import MethodConfig


class FullConfig(MethodConfig):
    """Full fine-tuning has no options."""

    method = "full"


def inject(model: nn.Module, config: FullConfig, adapter_name: str) -> list[str]:
    """Make every parameter trainable; nothing is wrapped."""
    model.requires_grad_(True)
    return []


def adapter_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The whole state dict (live tensors), each storage once: tied weights keep their first name."""
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, torch.dtype]] = set()
    for key, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
                    tensor.numel(), tensor.dtype)
        if tensor.numel() and identity in seen:
            continue  # an alias of a tensor already listed (tied embeddings)
        seen.add(identity)
        state[key] = tensor
    return state
