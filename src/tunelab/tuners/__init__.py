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

Layout (imports point down this list; no circles, see tests/test_imports.py):

- the core, at top level: ``base`` (the wrapper-layer contract), ``targets`` (target_modules
  matching), ``peft_format`` (HF PEFT file layout, a leaf), ``modules_to_save`` (per-adapter head
  copies), ``full``; ``registry`` (one ``register`` call per method, with its PEFT converters) and
  ``core`` (the generic operations) above them;
- ``lora/``: ``lora``, ``dora`` (a LoRA variant), ``qlora``, ``loraplus`` (an optimizer rule),
  ``mixture`` (the learned mixture method), ``multi_lora`` (combination functions over named
  adapters; uses ``core``), ``peft`` (the family's PEFT converters);
- ``adapters/``: ``ia3``, ``bottleneck``, ``compacter``, ``adapterdrop`` (a training option);
- ``prompts/``: ``prompt``, ``prefix``, ``p_tuning_v2``, ``prompt_learning`` (their shared layer),
  ``prompt_peft`` (their PEFT converters), and CLIP prompt learning: ``coop``, ``vpt``, ``maple`` on
  ``clip_layers``.
"""

from tunelab.tuners.adapters.adapterdrop import parallel_adapters, set_adapter_drop
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
from tunelab.tuners.lora import loraplus  # noqa: F401  (``from tunelab.tuners import loraplus`` still works)
from tunelab.tuners.lora.loraplus import loraplus_param_groups
from tunelab.tuners.registry import MethodSpec, build_config, register

__all__ = [
    "BaseTunerLayer", "MethodConfig", "MethodSpec", "active_adapters", "adapters", "add_adapter", "apply",
    "build_config", "delete_adapter", "disabled", "load", "loraplus_param_groups", "merge", "methods",
    "register", "save",
    "set_active", "tuner_layers", "trainable_parameters", "unload", "unmerge",
    "parallel_adapters", "set_adapter_drop",
]
