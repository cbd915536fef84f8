"""LoRA+: different learning rates for LoRA's A and B (Hayou, Ghosh & Yu 2024, arXiv:2402.12354).

The idea: in ``dW = B A`` with ``B = 0`` at init, the two factors play different roles, and for wide
layers one learning rate for both is provably inefficient (feature learning is not stable in the
width limit). Training ``B`` with a larger rate fixes it and speeds up convergence (the paper reports
up to ~2x) at no extra cost:

    eta_B = lambda * eta_A,      lambda = loraplus_lr_ratio (16 recommended in the paper),
    eta_A = lr

It changes how an adapter trains, not what it is, so it is an optimizer rule, not a method:
:func:`loraplus_param_groups` returns optimizer parameter groups. They follow HF PEFT's
``peft.optimizers.create_loraplus_optimizer`` group for group, so results transfer:

=================  ===============================================  ==========================
group              parameters                                        lr, weight decay
=================  ===============================================  ==========================
A                  every other trainable parameter (``lora_A``, 2-D   ``lr``, ``weight_decay``
                   head weights)
embedding          parameters of adapter layers on an ``Embedding``   ``lr_embedding``, ``weight_decay``
B                  ``lora_B`` and 1-D parameters (DoRA's magnitude,   ``lr x ratio``, ``weight_decay``
                   gates) except biases and LayerNorm parameters
B, no decay        biases and LayerNorm parameters among those        ``lr x ratio``, 0
=================  ===============================================  ==========================

In training: ``train(..., param_groups=loraplus_param_groups(model, lr, 16))`` (the schedule scales each
group's rate alike), or the method option ``loraplus_lr_ratio`` in an experiment config.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from tunelab.errors import ConfigError
from tunelab.tuners import targets
from tunelab.tuners.base import BaseTunerLayer, get_state

DEFAULT_RATIO = 16.0  # the paper's recommendation for lambda = eta_B / eta_A
DEFAULT_LR_EMBEDDING = 1e-6  # HF PEFT's default rate for LoRA on embedding layers


def _embedding_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of parameters held by adapter layers whose base module is an ``nn.Embedding``."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and isinstance(targets.base_of(module), nn.Embedding):
            base_ids = {id(p) for p in module.base_layer.parameters()}
            ids.update(id(p) for p in module.parameters() if id(p) not in base_ids)
    return ids


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = DEFAULT_RATIO, *,
                          lr_embedding: float = DEFAULT_LR_EMBEDDING,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups for LoRA+ over the model's trainable parameters (HF PEFT's four groups).

    Args:
        model: a tuned model (parameters with ``requires_grad`` are grouped).
        lr: ``eta_A``, the base learning rate.
        ratio: ``eta_B / eta_A`` (the paper: 16; PEFT's ``loraplus_lr_ratio``).
        lr_embedding: rate of adapters on embedding layers (PEFT's ``loraplus_lr_embedding``).
        weight_decay: decay of every group but "B, no decay" (PEFT's ``loraplus_weight_decay``).

    Returns:
        ``[{"params", "lr", "weight_decay"}, ...]`` in PEFT's order: A, embedding, B, B without decay
        (empty groups included, as PEFT passes them); ready for ``torch.optim`` or ``train(param_groups=)``.
    """
    if lr <= 0 or ratio <= 0 or lr_embedding <= 0 or weight_decay < 0:
        raise ConfigError(f"invalid LoRA+ settings lr={lr}, ratio={ratio}, lr_embedding={lr_embedding}, "
                          f"weight_decay={weight_decay}; use positive rates and weight_decay >= 0")
    decay_names = {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in name}
    embedding_ids = _embedding_parameter_ids(model)
    group_a, embedding, group_b, group_b_no_decay = [], [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in embedding_ids:
            embedding.append(parameter)
        elif "lora_B" in name or parameter.ndim == 1:
            (group_b if name in decay_names else group_b_no_decay).append(parameter)
        else:
            group_a.append(parameter)
    if not (group_a or embedding or group_b or group_b_no_decay):
        raise ConfigError("the model has no trainable parameters; apply a tuner method before LoRA+ grouping")
    return [
        {"params": group_a, "lr": lr, "weight_decay": weight_decay},
        {"params": embedding, "lr": lr_embedding, "weight_decay": weight_decay},
        {"params": group_b, "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": group_b_no_decay, "lr": lr * ratio, "weight_decay": 0.0},
    ]


def configured_ratio(model: nn.Module) -> float | None:
    """The ``loraplus_lr_ratio`` set on the model's adapters (None: LoRA+ is off).

    Several adapters must agree (one optimizer serves them all).
    """
    state = get_state(model)
    configs = state.configs.values() if state else []
    ratios = {getattr(config, "loraplus_lr_ratio", None) for config in configs} - {None}
    if len(ratios) > 1:
        raise ConfigError(f"adapters set different loraplus_lr_ratio values {sorted(ratios)}; use one ratio")
    return next(iter(ratios), None)
