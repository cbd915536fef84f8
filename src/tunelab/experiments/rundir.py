"""The run directory ``<output_dir>/<name>/``: its lock, its cell identities, and what may be written when.

- **Lock**: one process works on a run directory at a time. ``RunLock`` takes an exclusive
  ``fcntl.flock`` on the directory itself (no lock file to leave behind; the kernel releases it when
  the process dies, so a crashed run never leaves a stale lock); a second run fails at once with one line.
- **Cell identity**: a finished cell's result file carries ``cell_key`` (:func:`tunelab.experiments.grid.cell_key`);
  a result whose key differs from the current cell's is stale: it is moved to ``results/superseded/``
  and the cell runs again. Results of cells that are no longer in the grid move there too, so that
  ``config.yaml`` and ``results/*.json`` always describe each other.
- **Failed cells**: a cell that stopped with an error has no result but ``failed/<run>.json`` (error type,
  one-line message, exit code) and ``failed/<run>.log`` (the end of its log); a rerun retries it and
  removes both when it finishes. Records of cells that left the grid or whose config changed are dropped.
- **Nothing before the first cell**: :func:`check_writable` runs in preflight; the directory itself is
  created only when the first cell starts.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.utils import atomic_write_json, atomic_write_text

LOG_TAIL = 200_000  # characters of a failed cell's log kept in failed/<run>.log


def flock(path: Path, open_flags: int, blocking: bool) -> int | None:
    """An exclusive POSIX ``flock`` on ``path`` opened with ``open_flags``: the descriptor (closing it
    releases the lock), or None where ``fcntl`` is unavailable (Windows: nothing is locked there).
    Non-blocking, a held lock raises ``OSError``."""
    try:
        import fcntl
    except ImportError:
        return None
    handle = os.open(path, open_flags, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        raise
    return handle


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Wait for an exclusive ``flock`` on the file ``path`` (created if missing) and hold it for the block."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handle = flock(path, os.O_RDWR | os.O_CREAT, blocking=True)
    try:
        yield
    finally:
        if handle is not None:
            os.close(handle)


class RunLock:
    """An exclusive, non-blocking lock on a run directory (POSIX ``flock``; a no-op where unavailable)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.handle = Path(run_dir), None

    def acquire(self) -> RunLock:
        if self.handle is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.handle = flock(self.run_dir, os.O_RDONLY, blocking=False)
        except OSError:
            raise ConfigError(f"run directory {self.run_dir} is in use by another tunelab run; wait for it to "
                              "finish, or give this run another name") from None
        return self

    def release(self) -> None:
        if self.handle is not None:
            os.close(self.handle)  # closing the descriptor releases the flock
            self.handle = None


def check_writable(run_dir: Path) -> None:
    """The run directory can be created (or written, if it exists): one line otherwise, nothing written."""
    run_dir = Path(run_dir)
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"output path {path} is a file, not a directory; change output_dir or name")
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"cannot write to {path} (permission denied); change output_dir")
            return


def result_key(path: Path) -> str | None:
    """The ``cell_key`` a result file was produced with (None for unreadable or older result files)."""
    try:
        return json.loads(path.read_text()).get("cell_key")
    except (OSError, ValueError, AttributeError):
        return None


def supersede(path: Path) -> Path:
    """Move a stale result file (or adapter directory) under ``superseded/`` next to it; never delete it."""
    target_dir = path.parent / "superseded"
    target_dir.mkdir(exist_ok=True)
    target = target_dir / path.name
    index = 1
    while target.exists():
        target = target_dir / f"{path.stem}.{index}{path.suffix}"
        index += 1
    shutil.move(str(path), str(target))
    return target


def write_failure(run_dir: Path, run_id: str, record: dict, log: str | None) -> dict:
    """Record a failed cell: ``failed/<run>.json`` and, with a log, ``failed/<run>.log`` (its end)."""
    folder = Path(run_dir) / "failed"
    if log:
        atomic_write_text(folder / f"{run_id}.log", log[-LOG_TAIL:])
        record = {**record, "log": f"failed/{run_id}.log"}
    atomic_write_json(folder / f"{run_id}.json", record)
    return record


def clear_failure(run_dir: Path, run_id: str) -> None:
    for suffix in (".json", ".log"):
        (Path(run_dir) / "failed" / f"{run_id}{suffix}").unlink(missing_ok=True)


def failures(run_dir: Path) -> list[dict]:
    """The failure records of a run directory, by run id."""
    records = []
    for path in sorted((Path(run_dir) / "failed").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def drop_stale_failures(run_dir: Path, keys: dict[str, str]) -> None:
    """Forget failures of cells that left the grid (``keys``: run id -> current cell key) or changed config."""
    for path in sorted((Path(run_dir) / "failed").glob("*.json")):
        if keys.get(path.stem) != result_key(path):
            clear_failure(run_dir, path.stem)


def read_config(run_dir: Path) -> dict | None:
    """The run's ``config.yaml`` as a mapping; None when it is missing, unreadable or not a mapping (a run
    directory may hold results alone)."""
    import yaml

    try:
        raw = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def experiment_name(run_dir: Path, results: list[dict]) -> str:
    """The run's experiment name: ``name`` in its ``config.yaml`` (results reused from another run by cell key
    carry that run's name), else the first result's, else the folder's name."""
    name = (read_config(run_dir) or {}).get("name")
    if isinstance(name, str):
        return name
    return (results[0].get("experiment") if results else None) or Path(run_dir).name
