"""Every registered objective under DDP (2 processes, torchrun, gloo, CPU) against one process, same global batch.

    python benchmarks/ddp_objectives.py

Runs ``tests/_ddp_objectives_worker.py`` — the worker of ``tests/test_ddp_objectives.py`` — once with one
process (batch 4) and once with two (batch 2 each), 2 optimizer steps per objective, and compares them
per objective (``_ddp_objectives_worker.compare``): the largest difference of the logged loss curves, of
the rank-0 eval loss and of the trained tensors between 1 and 2 processes, whether the two ranks hold
bitwise identical trainable tensors after every step, and the teacher / reference placement check.
Writes ``benchmarks/results/ddp_objectives.json`` and the section of ``benchmarks/results/ddp_cpu.md``
that starts at :data:`MARKER` (replaced on every run; ``benchmarks/ddp_cpu.py`` keeps it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import _ddp_objectives_worker as worker  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MARKER = "<!-- benchmarks/ddp_objectives.py -->"


def launch(output_dir: Path, processes: int) -> float:
    command, env = worker.launch_command(output_dir, processes)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
    return time.perf_counter() - started


def main() -> None:
    from tunelab.experiments import registry

    names = [*registry.objectives(), *worker.VARIANTS]
    with tempfile.TemporaryDirectory() as tmp:
        wall = {p: launch(Path(tmp) / str(p), p) for p in (1, 2)}
        rows = [worker.compare(Path(tmp) / "1", Path(tmp) / "2", name) for name in names]
    (RESULTS / "ddp_objectives.json").write_text(json.dumps(
        {"setup": {"model": "tiny random Llama (2 layers, hidden 32) / tiny BERT; LoRA r=4", "global_batch": 4,
                   "steps": worker.STEPS, "backend": "gloo (CPU)", "threads_per_process": 1,
                   "wall_s_per_launch": wall},
         "objectives": rows}, indent=1, default=str) + "\n")

    def cell(row: dict, key: str, fmt: str = "{:.1e}") -> str:
        return fmt.format(row[key]) if key in row else "-"

    lines = []
    for row in rows:
        tolerance = "not compared" if row["tolerance"] is None else f"{row['tolerance']:.0e}"
        identical = "error" if row["errors"] else ("yes" if row["ranks_identical"] and row["state_identical"] else "NO")
        placed = "-" if not row.get("frozen_items") else ("ok" if not row["frozen_problems"] else "NO")
        lines.append(f"| {row['name']} | {worker.SETUPS.get(row['name'], '')} | {cell(row, 'max_loss_diff')} | "
                     f"{cell(row, 'eval_diff')} | {cell(row, 'max_param_diff')} | {identical} | {tolerance} | {placed} |")
    notes = "\n".join(f"- `{name}`: {reason}" for name, (_, reason) in worker.TOLERANCES.items())
    section = (
        f"{MARKER}\n## Every registered objective, 1 vs 2 processes\n\n"
        f"`benchmarks/ddp_objectives.py` (the worker of `tests/test_ddp_objectives.py`): {worker.STEPS} steps per "
        "objective, global batch 4 (1 process x 4, 2 processes x 2), tiny random models, LoRA r=4, gloo, 1 thread "
        f"per process; one launch for all objectives: {wall[1]:.0f} s with 1 process, {wall[2]:.0f} s with 2 "
        "(start-up included). Differences are absolute, between the 1-process run and rank 0 of the 2-process "
        "run: the logged loss at each step (max), the final rank-0 eval loss, and every trained tensor (max). "
        "*Ranks identical*: both ranks hold bitwise equal trainable tensors (model + the objective's modules) "
        "after every step and equal objective state. *Teacher / reference*: the teacher's or reference's "
        "tensors keep storage and values from the first to the last step and no `.to()` is called on a "
        "teacher during training. Tolerance (loss): "
        f"{worker.EXACT:.0e} where {worker.EXACT_REASON}; trained tensors within {worker.PARAMS:.0e} "
        f"({worker.PARAMS_REASON}).\n\n"
        "| objective | case | loss diff | eval diff | tensor diff | ranks identical | tolerance | teacher / reference |\n"
        "|---|---|---:|---:|---:|:---:|---|:---:|\n" + "\n".join(lines) + "\n\n" + notes + "\n")
    target = RESULTS / "ddp_cpu.md"
    text = target.read_text() if target.is_file() else ""
    head = text.split(MARKER)[0].rstrip("\n")
    target.write_text((head + "\n\n" if head else "") + section)
    print(section)


if __name__ == "__main__":
    main()
