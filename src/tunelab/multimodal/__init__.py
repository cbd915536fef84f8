"""tunelab.multimodal: CLIP-style models and multimodal prompt tuning on a built-in image–caption world.

- :mod:`~tunelab.multimodal.images` — the world: shapes × colours × sizes × positions rendered with
  numpy, captions from templates, 24 classes split into base and novel;
- :mod:`~tunelab.multimodal.clip` — the ``tiny-clip`` preset: a word-level tokenizer, a tiny
  ``transformers.CLIPModel``, contrastive pretraining and its cache, :class:`ZeroShotClassifier`;
- :mod:`~tunelab.multimodal.prompts` — the wrapper layers that put prompts into CLIP's two encoders;
- :mod:`~tunelab.multimodal.coop`, :mod:`~tunelab.multimodal.vpt`, :mod:`~tunelab.multimodal.maple` —
  the methods, registered as ``tuners.apply(clip_model, "coop" | "vpt" | "maple", ...)``;
- :mod:`~tunelab.multimodal.protocol` — few-shot training on base classes, evaluation on base and
  novel classes, harmonic mean (CoCoOp / MaPLe's base-to-novel protocol).

This package imports nothing heavy at import time: the tuner registry imports the method modules.
"""
