"""Run state on disk: atomic checkpoints, RNG capture, trainable weights and the metrics log.

A checkpoint is everything a run needs to continue *bit for bit* where it stopped::

    output_dir/checkpoint/
      trainable.safetensors   parameters with requires_grad=True, by name (nothing frozen)
      optimizer.pt            optimizer.state_dict()  (AdamW moments and step counts)
      scheduler.pt            LambdaLR.state_dict()   (step counter, base learning rates)
      rng.pt                  torch CPU (and CUDA) generator states
      rng.json                Python `random` and NumPy global generator states
      objective.pt            the objective's own state (EWC's Fisher, a controller's value, ...)
      state.json              step, data position, counters, config, trainable names — written last

Atomicity: files go to ``output_dir/.checkpoint.tmp/`` and are fsynced; then the current checkpoint is
renamed to ``.checkpoint.old``, the temporary directory renamed to ``checkpoint``, and the old one
deleted. A crash at any point leaves a complete checkpoint: ``checkpoint/`` if it exists, otherwise
``.checkpoint.old/`` (the crash fell between the two renames), which :func:`find_checkpoint` falls
back to. A directory counts only if its ``state.json`` exists, and that file is written last.

``metrics.jsonl`` is append-only; when a run resumes from step ``s``, :class:`MetricsLog` drops the
lines logged after ``s`` (the resumed run logs them again), so the file always describes one run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import ConfigError
from tunelab.utils import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint"
TMP_NAME = ".checkpoint.tmp"
OLD_NAME = ".checkpoint.old"
STATE_FILE = "state.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- trainable weights
def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters with ``requires_grad=True`` (shared ones once)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy ``tensors`` into the model's trainable parameters; the name sets must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise ConfigError(
            f"{source} holds different trainable parameters than the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); resume with the same model and method, or start with resume=False"
        )
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != tensors[name].shape:
                raise ConfigError(
                    f"{source}: parameter {name} has shape {tuple(tensors[name].shape)}, the model "
                    f"{tuple(param.shape)}; resume with the same model configuration"
                )
            param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def save_trainable(model: nn.Module, path: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the trainable parameters (or ``tensors``, e.g. gathered from FSDP shards) to safetensors atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(_cpu_tensors(tensors if tensors is not None else trainable_state_dict(model)), str(tmp),
                  metadata={"format": "pt"})
    return path


# ----------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """States of Python's ``random``, NumPy's global generator, torch CPU and every CUDA device."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoint
@dataclass
class Checkpoint:
    """A loaded checkpoint; ``state`` is the parsed ``state.json``."""

    path: Path
    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    objective: dict[str, Any] | None = None

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk (directories cannot be opened on Windows: skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without fsync on directories
        pass
    finally:
        os.close(fd)


def _write_files(
    directory: Path,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    rng: dict[str, Any],
    state: dict[str, Any],
    objective_state: dict[str, Any] | None = None,
) -> None:
    names = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "rng.json"]
    if objective_state:
        torch.save(objective_state, directory / "objective.pt")
        names.append("objective.pt")
    save_file(_cpu_tensors(trainable), str(directory / "trainable.safetensors"), metadata={"format": "pt"})
    torch.save(optimizer_state, directory / "optimizer.pt")
    torch.save(scheduler_state, directory / "scheduler.pt")
    torch.save({"torch": rng["torch"], "cuda": rng["cuda"]}, directory / "rng.pt")
    (directory / "rng.json").write_text(json.dumps({"python": rng["python"], "numpy": rng["numpy"]}))
    for name in names:
        _fsync(directory / name)
    # state.json last: its presence marks the directory complete
    (directory / STATE_FILE).write_text(
        json.dumps({"format": FORMAT_VERSION, **state}, indent=2, default=str)
    )
    _fsync(directory / STATE_FILE)
    _fsync(directory)


def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    state: dict[str, Any],
    rng: dict[str, Any] | None = None,
    objective_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/checkpoint/`` atomically (see the module docstring) and return its path.

    Args:
        output_dir: the run directory.
        trainable: ``{name: tensor}`` of trainable parameters.
        optimizer_state: ``optimizer.state_dict()``.
        scheduler_state: ``scheduler.state_dict()``.
        state: JSON-able run state; must hold ``"step"``.
        rng: from :func:`capture_rng_state`; captured now when omitted.
        objective_state: the objective's ``state_dict()`` (tensors and plain values), if any.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final, tmp, old = output_dir / CHECKPOINT_NAME, output_dir / TMP_NAME, output_dir / OLD_NAME
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crash mid-write
    tmp.mkdir()
    _write_files(tmp, trainable, optimizer_state, scheduler_state, rng or capture_rng_state(), state,
                 objective_state)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(output_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint directory in ``output_dir``, or ``None``."""
    for name in (CHECKPOINT_NAME, OLD_NAME):
        candidate = Path(output_dir) / name
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_checkpoint(output_dir: str | os.PathLike) -> Checkpoint | None:
    """Load the checkpoint of ``output_dir`` onto the CPU, or return ``None`` when there is none."""
    path = find_checkpoint(output_dir)
    if path is None:
        return None
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    rng.update(json.loads((path / "rng.json").read_text()))
    return Checkpoint(
        path=path,
        state=json.loads((path / STATE_FILE).read_text()),
        trainable=load_file(str(path / "trainable.safetensors")),
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        scheduler=torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True),
        rng=rng,
        objective=torch.load(path / "objective.pt", map_location="cpu", weights_only=True)
        if (path / "objective.pt").is_file() else None,
    )


def remove_checkpoint(output_dir: str | os.PathLike) -> None:
    """Delete every checkpoint directory of ``output_dir`` (a fresh run replaces the old one)."""
    for name in (CHECKPOINT_NAME, OLD_NAME, TMP_NAME):
        shutil.rmtree(Path(output_dir) / name, ignore_errors=True)


# ----------------------------------------------------------------------------- metrics log
class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as events happen.

    ``records`` mirrors the file in memory (it is what ``TrainResult.history`` returns). With
    ``path=None`` (no output directory, or a non-main process) only the memory copy is kept.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []

    def restart(self, keep_through_step: int | None) -> None:
        """Start the log: empty (``None``) or keeping only the lines with ``step <= keep_through_step``.

        Unparsable lines — a line cut short by a kill — are dropped too.
        """
        self.records = []
        if self.path is None:
            return
        if keep_through_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= keep_through_step:
                    self.records.append(record)
        text = "".join(json.dumps(record) + "\n" for record in self.records)
        atomic_write_text(self.path, text)

    def append(self, record: dict[str, Any]) -> None:
        """Add one event (kept in memory, and appended to the file when there is one)."""
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
