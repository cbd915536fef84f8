"""Step-time ratios that do not depend on which model a process happened to build first.

Timing two implementations in one process, alternating steps, still left a bias of up to ±10 % on
this 2-core CPU: the same matmuls ran at different speeds in the two models depending on where their
weights and activations landed in memory (the build order flipped the sign of the difference). So a
comparison here is several *rounds*, each in a fresh interpreter: a round builds both sides (the
build order alternates between rounds), warms them up, times ``steps`` alternating training steps
and reports the median step of each side. The result is the median over rounds of the per-round
ratio ``ours / reference``, with every round's ratio kept for the record.

A benchmark script opts in with two pieces: ``time_round(builders, order, steps)`` inside its
``--time-round`` entry point, and ``alternating_rounds(command, rounds)`` in its driver.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

SIDES = ("tunelab", "peft")


def time_round(builders: dict[str, Callable[[], Callable[[], float | None]]], order: list[str],
               steps: int) -> dict[str, float]:
    """Build the sides in ``order``, warm each up, time ``steps`` alternating steps; median seconds.

    ``builders[side]()`` returns a ``step()`` callable (one optimizer step); if ``step()`` returns a
    float it is taken as the step's duration, otherwise the call is timed here.
    """
    steppers = {side: builders[side]() for side in order}
    for step in steppers.values():
        step()  # warm-up: allocator, lazy initialisation, first-call overheads
    times: dict[str, list[float]] = {side: [] for side in order}
    for index in range(steps):
        for side in order if index % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            measured = steppers[side]()
            times[side].append(measured if isinstance(measured, float) else time.perf_counter() - started)
    return {side: statistics.median(values) for side, values in times.items()}


def run_json(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``command``; its last stdout line is JSON. A failure raises with the command's stderr tail."""
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed: {' '.join(command)}\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def alternating_rounds(command: list[str], rounds: int) -> dict:
    """Run ``command + ["--time-round", order]`` in ``rounds`` fresh processes (the order alternates).

    The command's last stdout line must be the JSON of :func:`time_round`. Returns the median of the
    per-round ratios (``time_ratio``), every round's ratio, and the median step of each side in ms.
    """
    ratios, steps = [], {side: [] for side in SIDES}
    for index in range(rounds):
        order = ",".join(SIDES if index % 2 == 0 else SIDES[::-1])
        medians = run_json([*command, "--time-round", order])
        ratios.append(medians["tunelab"] / medians["peft"])
        for side in SIDES:
            steps[side].append(medians[side])
    return {"time_ratio": statistics.median(ratios), "round_ratios": ratios, "rounds": rounds,
            "step_ms": {side: 1000 * statistics.median(values) for side, values in steps.items()}}


def python_command(script: str, *args: str) -> list[str]:
    """``[python, script, *args]`` for the current interpreter."""
    return [sys.executable, script, *args]
