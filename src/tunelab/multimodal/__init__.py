"""tunelab.multimodal: CLIP-style models and multimodal prompt tuning on a built-in image–caption world.

- :mod:`~tunelab.multimodal.images` — the world: shapes × colours × sizes × positions rendered with
  numpy, captions from templates, 24 classes split into base and novel;
- :mod:`~tunelab.multimodal.clip` — the ``tiny-clip`` preset: a word-level tokenizer, a tiny
  ``transformers.CLIPModel``, contrastive pretraining and its cache, :class:`ZeroShotClassifier`;
- the methods CoOp, VPT and MaPLe live with the other prompt methods in ``tunelab.tuners.prompts``
  (``coop``, ``vpt``, ``maple``, and ``clip_layers``, the wrappers that put prompts into CLIP's two
  encoders) and are registered there: ``tuners.apply(clip_model, "coop" | "vpt" | "maple", ...)``.
  This package imports ``tuners``; ``tuners`` never imports it;
- :mod:`~tunelab.multimodal.protocol` — few-shot training on base classes, evaluation on base and
  novel classes, harmonic mean (CoCoOp / MaPLe's base-to-novel protocol).

This package imports nothing at import time.
"""
