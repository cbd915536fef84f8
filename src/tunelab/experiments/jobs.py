"""Cells in child processes: one at a time, or up to N at once (``tunelab run CONFIG --jobs N``), and what a
failed cell leaves behind.

Each cell runs in a child process (:mod:`tunelab.experiments.cell`) that dies with the parent. With
``--jobs N`` the children are started from N worker threads of the parent that only wait on them; every
child gets ``OMP_NUM_THREADS = max(1, cpus // N)`` (N = the cells that run at once), so N cells together
use the machine's cores instead of N times them. Only the parent prints what finished, writes failure
records and, after every cell has ended, the report.

A cell that fails (an error in the child, or the child killed from outside) becomes a failure record
(:func:`failure`, written to ``failed/<run>.json`` by the runner) and the other cells go on; the run then
ends with :class:`CellsFailed` (exit code 1). Ctrl-C is not a failure: it stops everything at once — no
further cell starts, running children get SIGINT (they exit 130 and keep their checkpoints), and any
child still alive after a grace period is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, TunelabError
from tunelab.experiments import rundir
from tunelab.utils import atomic_write_text


def check(jobs: int, isolate: bool, world_size: int) -> None:
    """``jobs`` fits the other settings of the run (one line otherwise)."""
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1 (got {jobs})")
    if jobs > 1 and not isolate:
        raise ConfigError("--jobs runs each cell in its own subprocess; it cannot be combined with --in-process "
                          "(drop one of them)")
    if jobs > 1 and world_size > 1:
        raise ConfigError("--jobs runs several cells at once and --processes (or torchrun) trains each cell with "
                          "several processes; use one of them")


def cpus() -> int:
    """The CPU cores this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def thread_env(jobs: int) -> dict[str, str]:
    """Environment of each of ``jobs`` concurrent cells: an equal share of the cores, at least one."""
    threads = str(max(1, cpus() // jobs))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def failure(cell, key: str, error_type: str, message: str, exit_code: int | None = None) -> dict:
    """The failure record of a cell: error type and a one-line message."""
    line = next((part.strip() for part in message.splitlines() if part.strip()), "") or "(no message)"
    return {"run_id": cell.run_id, "cell_key": key, "method_label": cell.method_label, "error_type": error_type,
            "message": line[:300], "exit_code": exit_code,
            "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def failed_message(failures: dict, total: int, run_dir: Path) -> str:
    """The one line a run with failed cells ends with: how many, the first one's error, where to look."""
    first = next(iter(failures.values()))
    more = f"; and {len(failures) - 1} more" if len(failures) > 1 else ""
    return (f"{len(failures)} of {total} cells failed ({first['run_id']}: {first['error_type']}: {first['message']}"
            f"{more}); see 'Failed cells' in {run_dir / 'report.md'}; rerun the same command to retry them (finished "
            "cells are skipped)")


def run_cell_process(cell, run_dir: Path, key: str, env: dict | None = None,
                     popen=subprocess.Popen) -> tuple[dict, str] | None:
    """Run one cell in a child process that dies with this one (see :mod:`tunelab.experiments.cell`).

    None when the cell finished; ``(failure record, end of the child's log)`` when it failed or was killed;
    Ctrl-C (the child exits 130) raises KeyboardInterrupt. ``env`` is added to the child's environment.
    """
    work = run_dir / ".work" / cell.run_id
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "cell.json", cell.model_dump_json())
    (work / "error.json").unlink(missing_ok=True)
    env = {**os.environ, **(env or {}), "TUNELAB_PARENT_PID": str(os.getpid())}
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        process = popen([sys.executable, "-m", "tunelab.experiments.cell", str(run_dir), cell.run_id, key],
                        stderr=log, env=env)
        try:
            code = process.wait()
        except BaseException:  # Ctrl-C (the child got SIGINT too) or any other exit: never leave it running
            stop(process)
            raise
        if code in (130, -signal.SIGINT):
            raise KeyboardInterrupt
        if code == 0:
            return None
        log.seek(0)
        text = log.read()[-rundir.LOG_TAIL:]
    try:
        error = json.loads((work / "error.json").read_text())  # written by the child (tunelab.experiments.cell)
    except (OSError, ValueError):
        error = None
    if code < 0:
        return failure(cell, key, "CellKilled", f"the cell's process was killed (signal {-code}), e.g. for lack of "
                       "memory; its checkpoints are kept", code), text
    if isinstance(error, dict):
        return failure(cell, key, str(error.get("type")), str(error.get("message")), code), text
    return failure(cell, key, "CellError", f"the cell's process exited with code {code}", code), text


class CellsFailed(TunelabError):
    """Some cells failed (``failed/<run>.json``); the report is written, the others finished: exit code 1."""

    exit_code = 1

    def __init__(self, message: str, results: list[dict]) -> None:
        super().__init__(message)
        self.results = results


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGINT (a cell saves nothing more and exits 130), then SIGKILL after ``grace`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Pool:
    """The children started for the cells; :meth:`stop` ends them all and lets no new one start."""

    def __init__(self, grace: float = 10.0) -> None:
        self.grace, self.lock, self.stopped = grace, threading.Lock(), False
        self.running: set[subprocess.Popen] = set()

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen``, refused once the pool is stopping (the cell counts as interrupted)."""
        with self.lock:
            if self.stopped:
                raise KeyboardInterrupt
            process = subprocess.Popen(*args, **kwargs)
            self.running.add(process)
            return process

    def halt(self) -> None:
        """No further child starts (the ones running go on)."""
        with self.lock:
            self.stopped = True

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            processes = list(self.running)
        try:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + self.grace
            for process in processes:
                try:
                    process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:  # also after a second Ctrl-C during the grace period
            for process in processes:
                if process.poll() is None:
                    process.kill()


def run(items: Iterable, jobs: int, work: Callable[[Any, Callable[..., subprocess.Popen]], Any],
        done: Callable[[Any, Any], None]) -> None:
    """``work(item, popen)`` for every item, ``jobs`` at a time; ``done(item, outcome)`` in this thread as each
    ends. An exception of ``work`` (KeyboardInterrupt from a child that exited 130) or of this thread stops
    every running child and is raised here."""
    pool = Pool()

    def guarded(item):
        if pool.stopped:  # a worker that frees up after an interruption starts nothing new
            raise KeyboardInterrupt
        try:
            return work(item, pool.popen)
        except BaseException:
            pool.halt()
            raise

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="tunelab-cell") as executor:
        futures = {executor.submit(guarded, item): item for item in items}
        try:
            for future in as_completed(futures):
                done(futures[future], future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            pool.stop()
            raise
