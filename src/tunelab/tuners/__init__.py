"""tunelab.tuners: PEFT methods on any PyTorch / transformers model, one generic core.

    from tunelab import tuners
    tuners.methods()                                        # ["full", "lora", ...]
    tuners.apply(model, "lora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    tuners.trainable_parameters(model)                      # only adapter parameters train
    tuners.set_active(model, ["default"])                   # which named adapters run
    with tuners.disabled(model): ...                        # the base model
    tuners.merge(model); tuners.unmerge(model); tuners.unload(model, merge=False)
    tuners.save(model, path, format="peft")                 # HF PEFT files; default: tunelab's format
    tuners.load(model, path)                                # either format, bare or tuned model

The pieces: ``base`` (the wrapper-layer contract), ``targets`` (target_modules matching),
``registry`` (one ``register`` call per method), ``core`` (the generic operations), one module per
method (``lora``, ``full``), ``modules_to_save`` and ``peft_format`` (HF PEFT interop).
"""

from tunelab.tuners.adapterdrop import parallel_adapters, set_adapter_drop
from tunelab.tuners.base import BaseTunerLayer, MethodConfig, tuner_layers
from tunelab.tuners.core import (
    active_adapters,
    adapters,
    add_adapter,
    apply,
    delete_adapter,
    disabled,
    load,
    merge,
    methods,
    save,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)
from tunelab.tuners.loraplus import loraplus_param_groups
from tunelab.tuners.registry import MethodSpec, build_config, register

__all__ = [
    "BaseTunerLayer", "MethodConfig", "MethodSpec", "active_adapters", "adapters", "add_adapter", "apply",
    "build_config", "delete_adapter", "disabled", "load", "loraplus_param_groups", "merge", "methods",
    "register", "save",
    "set_active", "tuner_layers", "trainable_parameters", "unload", "unmerge",
    "parallel_adapters", "set_adapter_drop",
]
