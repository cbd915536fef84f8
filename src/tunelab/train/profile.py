"""Efficiency measurements: parameters, peak memory, throughput, inference latency.

These are the numbers the experiment reports put beside quality: how many parameters a method trains,
how much memory the process peaked at, how many tokens per second it trained, how long one forward
pass takes. Each helper is small and has no side effects beyond the measurement.

- Parameters: ``sum(p.numel())`` over ``model.parameters()``; trainable ones have ``requires_grad``.
- Peak memory: the process's maximum resident set size from ``resource.getrusage`` (``ru_maxrss`` is
  KiB on Linux, bytes on macOS). It only grows, so compare cases in fresh subprocesses.
- Tokens: non-padding tokens, ``attention_mask.sum()`` when the batch has a mask.
- Latency: median wall time of repeated calls after warmup, with device synchronisation on CUDA.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameter counts; ``fraction`` = trainable / total."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count parameters (shared tensors once, as ``model.parameters()`` yields them)."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return ParameterCount(trainable=trainable, total=total)


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB, or ``None`` where ``resource`` is missing (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024
    return peak * bytes_per_unit / 2**20


def count_tokens(batch: Any) -> int:
    """Non-padding tokens in a batch: ``attention_mask`` sum, else ``input_ids`` size, else 0.

    Batches that are not mappings (a tuple of tensors, say) count as 0: their tokens are unknown.
    """
    if not isinstance(batch, Mapping):
        return 0
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum().item())
    input_ids = batch.get("input_ids")
    if isinstance(input_ids, torch.Tensor):
        return input_ids.numel()
    return 0


def tokens_per_second(tokens: int, seconds: float) -> float:
    """Throughput; 0.0 when no time has passed."""
    return tokens / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class LatencyStats:
    """Wall times of repeated calls, in seconds."""

    median_s: float
    mean_s: float
    min_s: float
    repeats: int


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_latency(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> LatencyStats:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls.

    Args:
        fn: the call to time, without arguments.
        warmup: untimed calls first (caches, lazy initialisation, kernel selection).
        repeats: timed calls; the median is robust to a stray slow one.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return LatencyStats(
        median_s=statistics.median(times), mean_s=statistics.fmean(times), min_s=min(times), repeats=repeats
    )


def inference_latency(
    model: nn.Module, batch: Mapping[str, Any], *, warmup: int = 1, repeats: int = 5
) -> LatencyStats:
    """Latency of one forward pass ``model(**batch)`` in eval mode without gradients.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return measure_latency(lambda: model(**batch), warmup=warmup, repeats=repeats)
    finally:
        model.train(was_training)
