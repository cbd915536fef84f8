"""Optimizer parameter groups of a training stage: the default split (matrices with weight decay,
vectors without), LoRA+'s groups (B at ``lr × loraplus_lr_ratio``, Hayou et al. 2024) and a learning
rate of its own for each combined method (``method.combine[*].learning_rate``). The runner builds a
stage's groups with :func:`optimizer_groups` and hands them to the training loop."""

from __future__ import annotations


def combined_rates(method, adapter_name: str) -> dict[str, float]:
    """``{adapter name: learning rate}`` of the methods ``method`` combines that set their own rate."""
    return {name: part.learning_rate for part, name in method.adapters(adapter_name)[1:]
            if part.learning_rate is not None}


def optimizer_groups(model, rates: dict[str, float], learning_rate: float, weight_decay: float) -> list[dict] | None:
    """The optimizer groups of a stage, or None for the default ones (every trainable parameter at
    ``learning_rate``; matrices with weight decay, vectors without).

    Each adapter in ``rates`` (a combined method with its own ``learning_rate``) gets its trainable
    parameters at that rate, split for weight decay as the default groups are; the schedule scales every
    group alike. The other parameters come first, at ``learning_rate`` (the rate the history logs), in
    LoRA+'s groups when ``loraplus_lr_ratio`` is set (:func:`loraplus_groups`).
    """
    loraplus = loraplus_groups(model, learning_rate, weight_decay)
    if not rates:
        return loraplus
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    own = {adapter: [p for name, p in trainable if adapter in name.split(".")] for adapter in rates}
    taken = {id(p) for params in own.values() for p in params}
    if loraplus is not None:
        groups = [{**group, "params": [p for p in group["params"] if id(p) not in taken]} for group in loraplus]
    else:
        groups = _decay_groups([p for _, p in trainable if id(p) not in taken], learning_rate, weight_decay)
    for adapter, rate in rates.items():
        groups += _decay_groups(own[adapter], rate, weight_decay)
    return [group for group in groups if group["params"]]


def _decay_groups(params: list, learning_rate: float, weight_decay: float) -> list[dict]:
    """Matrices with weight decay, vectors (biases, norms, scales) without, as the default groups."""
    return [{"params": [p for p in params if p.ndim >= 2], "lr": learning_rate, "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "lr": learning_rate, "weight_decay": 0.0}]


def loraplus_groups(model, learning_rate: float, weight_decay: float) -> list[dict] | None:
    """LoRA+ optimizer groups when the method sets ``loraplus_lr_ratio`` (B at lr x ratio); else None."""
    from tunelab.tuners import loraplus

    ratio = loraplus.configured_ratio(model)
    if ratio is None:
        return None
    return loraplus.loraplus_param_groups(model, learning_rate, ratio, weight_decay=weight_decay)
