"""P-Tuning v2 (Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally
Across Scales and Tasks", https://arxiv.org/abs/2110.07602).

Deep prompts for *understanding* tasks: trainable key/value prompts at every layer (prefix tuning's
mechanism, see ``prefix``) plus a randomly initialised linear head on the frozen encoder's
representations -- no verbalizer, no LM head::

    h = Encoder_frozen(x; [K_P^l; V_P^l] for l = 1..L)
    classification:   y = softmax(W h_[CLS])           token tagging (NER):   y_t = softmax(W h_t)

Trainable: the prompts (optionally through the reparameterization MLP, ``prefix_projection``) and
the head ``W``. The paper's point: shallow prompts (prompt tuning: input layer only) lag fine-tuning
on small models and fail on sequence tagging; deep prompts close the gap
(``benchmarks/p_tuning_v2_comparison.py`` checks this on MiniLM).

How the code maps to it: the prefix layer of ``prefix`` holds the prompts; :func:`inject` also puts
the model's classification head (``classifier`` / ``score``) in ``modules_to_save`` when none is
named, so the head trains and is saved with the adapter (HF PEFT does the same for its SEQ_CLS /
TOKEN_CLS task types; in PEFT, P-Tuning v2 *is* prefix tuning with such a head). It works on encoders
(BERT/MiniLM ``*ForSequenceClassification`` / ``*ForTokenClassification``) and decoders
(``LlamaForSequenceClassification``, ...); on decoders the ``input_ids`` still reach the model, so
it finds the last real token of right-padded batches.
"""

from __future__ import annotations

from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners.prompts import prefix
from tunelab.tuners.targets import CLASSIFIER_HEAD_NAMES


class PTuningV2Config(prefix.PrefixTuningConfig):
    """Prefix tuning's options; ``modules_to_save=None`` means the model's classification head."""

    method = "p_tuning_v2"


def classification_heads(model: nn.Module) -> list[str]:
    """The model's linear head(s) by PEFT's names (``classifier``, ``score``)."""
    return [name for name in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def inject(model: nn.Module, config: PTuningV2Config, adapter_name: str) -> list[str]:
    """Deep prompts as in prefix tuning, and the classification head trains beside them."""
    if config.modules_to_save is None:
        heads = classification_heads(model)
        if not heads:
            raise MethodError(f"p_tuning_v2 trains a classification head but {type(model).__name__} has none "
                              "('classifier' or 'score'); load the model with a classification task "
                              "or pass modules_to_save")
        config.modules_to_save = heads
    return prefix.inject(model, config, adapter_name)
