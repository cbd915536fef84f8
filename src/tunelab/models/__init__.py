"""tunelab.models: presets and loading (``zoo``, ``tiny``), named task heads, feature taps."""

from tunelab.models.heads import HeadOutput, HeadSpec, TaskHeads, best_spans, load_heads, pool, save_heads
from tunelab.models.hooks import FeatureTap, FeatureTapError

__all__ = ["FeatureTap", "FeatureTapError", "HeadOutput", "HeadSpec", "TaskHeads", "best_spans", "load_heads", "pool",
           "save_heads"]
