"""tunelab.train: the training loop, its checkpoints and schedules, and efficiency measurements.

```python
from tunelab.train import TrainConfig, train
result = train(model, records, collate_fn, TrainConfig(max_steps=200), output_dir="runs/x", resume=True)
```
See docs/training.md.
"""

from tunelab.train.checkpoint import load_checkpoint, save_trainable, trainable_state_dict
from tunelab.train.config import TrainConfig
from tunelab.train.loop import TrainResult, default_loss, evaluate_loss, train
from tunelab.train.profile import count_parameters, inference_latency, measure_latency, peak_rss_mb

__all__ = [
    "TrainConfig",
    "TrainResult",
    "count_parameters",
    "default_loss",
    "evaluate_loss",
    "inference_latency",
    "load_checkpoint",
    "measure_latency",
    "peak_rss_mb",
    "save_trainable",
    "train",
    "trainable_state_dict",
]
