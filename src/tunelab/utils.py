"""Small shared helpers: seeding, the tunelab home directory, atomic file writes, data-parallel wrappers."""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def unwrap_model(model: Any) -> Any:
    """The model under a data-parallel wrapper (DDP, DataParallel, FSDP1: they expose it as ``.module``).

    Under ``accelerate launch`` the training loop hands ``objective.loss`` the DDP wrapper: code that reads
    what tunelab attached to the model (its tuner state, a cross-stage store, heads) or that runs the
    model outside the synchronised training step (generation, rank-local passes) uses the model itself.
    """
    while type(model).__name__ in WRAPPERS and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def is_data_parallel(model: Any) -> bool:
    """True when ``model`` is a DDP wrapper of a multi-process run: a collective here is joined by every rank."""
    return type(model).__name__ == "DistributedDataParallel" and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def data_parallel_size(model: Any) -> int:
    """How many processes train together when ``model`` is the DDP wrapper of a training step (else 1)."""
    return torch.distributed.get_world_size() if is_data_parallel(model) else 1


def ranks_mean(value: torch.Tensor, model: Any) -> torch.Tensor:
    """The mean of ``value`` over the processes when ``model`` is the DDP wrapper of a training step, else ``value``.

    For batch statistics an objective must share across ranks to match one process on the global batch
    (KTO's KL reference point, PPO's KL for its adaptive coefficient). Keyed on the wrapper, not on the
    world size: the loop hands ``loss()`` the wrapper only in training steps, which every rank runs, while
    rank 0's evaluation gets the bare model — an all-reduce there would wait for ranks that never come.
    Detached: a statistic, not a term gradients flow through.
    """
    if not is_data_parallel(model):
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()


def tunelab_home() -> Path:
    """Cache directory for pretrained tiny models: ``$TUNELAB_HOME`` or ``~/.cache/tunelab``."""
    home = os.environ.get("TUNELAB_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "tunelab"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed over ``path`` atomically.

    Readers never see a half-written file: either the old content or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results and reports get the usual mode (0644)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
