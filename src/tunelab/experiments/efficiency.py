"""Efficiency figures of a cell beside its score, in the shape of HF PEFT's ``method_comparison``.

PEFT's method_comparison logs the accelerator memory after every training step and reports its mean,
maximum and 99th percentile, the inference time, and the adapter's size on disk. tunelab records the
same for every cell (``record["efficiency"]``, the report's *Efficiency* section):

- ``train_memory_mb`` / ``inference_memory_mb`` — ``{"mean", "p99", "max", "samples"}`` of the memory
  in use, sampled by a background thread every ``interval`` seconds (and once at the start and end of
  the window) while the stage trains / while the test set is scored and latency is timed. On CUDA the
  sample is ``torch.cuda.memory_reserved()`` (what PEFT logs), otherwise this process's resident set
  (RSS, from ``/proc/self/statm``; ``psutil`` elsewhere). p99 is the nearest-rank percentile:
  the ⌈0.99·n⌉-th smallest of the n samples. With several stages the cell's mean weighs each stage by
  its samples and its p99 / max are the largest stage's.
- ``latency_ms_unmerged`` / ``latency_ms_merged`` — the median forward time over a batch of 8 test
  prompts with the adapters as trained and with them folded into the base weights
  (``tuners.merge``, undone after); ``merged`` is None for methods that cannot merge (prompts,
  bottleneck adapters) and for full fine-tuning (nothing to merge).
- ``adapter_mb`` — the bytes of the saved adapter in tunelab's format (its folder, without the PEFT-format
  copy), in MiB: what a user stores per task.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def memory_now_mb(device: torch.device | None = None) -> float | None:
    """Memory in use now, MiB: CUDA reserved memory on a CUDA device, else this process's RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.memory_reserved(device) / 2**20
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE / 2**20
    except OSError:
        try:
            import psutil
        except ImportError:
            return None
        return psutil.Process().memory_info().rss / 2**20


def summarize(samples: Sequence[float]) -> dict[str, float] | None:
    """``{"mean", "p99", "max", "samples"}`` of ``samples`` (nearest-rank p99); None when there are none."""
    values = sorted(float(v) for v in samples if v is not None)
    if not values:
        return None
    rank = max(1, math.ceil(0.99 * len(values)))
    return {"mean": sum(values) / len(values), "p99": values[rank - 1], "max": values[-1], "samples": len(values)}


def combine(summaries: Iterable[dict[str, float] | None]) -> dict[str, float] | None:
    """One summary from several windows' (stages'): sample-weighted mean, the largest p99 and max."""
    parts = [s for s in summaries if s]
    if not parts:
        return None
    count = sum(int(s["samples"]) for s in parts)
    return {"mean": sum(s["mean"] * s["samples"] for s in parts) / count, "p99": max(s["p99"] for s in parts),
            "max": max(s["max"] for s in parts), "samples": count}


class MemorySampler:
    """``with MemorySampler(device) as sampler: ...`` then ``sampler.summary()``.

    A daemon thread appends :func:`memory_now_mb` every ``interval`` seconds; one sample is taken on
    entry and one on exit, so even a short window has two.
    """

    def __init__(self, device: torch.device | None = None, interval: float = 0.05) -> None:
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        value = memory_now_mb(self.device)
        if value is not None:
            self.samples.append(value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread = threading.Thread(target=self._run, name="tunelab-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def summary(self) -> dict[str, float] | None:
        return summarize(self.samples)


def merged_latency_ms(model, measure) -> float | None:
    """``measure()`` (a latency in ms) with the active adapters merged into the base weights, then
    unmerged again; None when the model has no adapters or one of them cannot merge."""
    from tunelab import tuners
    from tunelab.errors import MethodError

    if not tuners.adapters(model) or next(tuners.tuner_layers(model), None) is None:
        return None  # a bare model, or full fine-tuning (no wrapper layer: nothing to fold)
    try:
        tuners.merge(model)
    except MethodError:
        return None
    try:
        return measure()
    finally:
        tuners.unmerge(model)


def adapter_mb(adapter_dir: Path) -> float | None:
    """MiB of the files under ``adapter_dir``, without its ``peft/`` copy; None when nothing was saved."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        return None
    files = [p for p in adapter_dir.rglob("*") if p.is_file() and p.relative_to(adapter_dir).parts[0] != "peft"]
    return sum(p.stat().st_size for p in files) / 2**20 if files else None
