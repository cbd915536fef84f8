"""One process vs two DDP processes (torchrun, gloo, CPU) on the same global batch: loss curves, adapter, speed.

    python benchmarks/ddp_cpu.py [--steps 30] [--repeats 2]

Runs ``tests/_ddp_worker.py`` (LoRA on a tiny random Llama with a learned loss weight) with
``batch_size=4`` in one process and ``batch_size=2`` in each of two processes, alternating A and B
``--repeats`` times. Records the per-step loss of each (first repeat), the largest absolute
difference of the loss curves and of the trained adapters, and the training throughput (records per
second of optimizer-step time, median over repeats) and wall time per launch (including start-up).
Writes ``benchmarks/results/ddp_cpu.json`` and ``.md`` (keeping the per-objective section that
``benchmarks/ddp_objectives.py`` appends).

On a 2-core machine two processes with one thread each cannot beat one process by much, and the
absolute times are noise from other work on the machine: the ratio is what to read, and what DDP
buys is capacity (one process per GPU), not speed on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_ddp_worker.py"
RESULTS = ROOT / "benchmarks" / "results"
GLOBAL_BATCH = 4
OBJECTIVES_MARKER = "<!-- benchmarks/ddp_objectives.py -->"  # that script's section of ddp_cpu.md, kept here


def launch(output_dir: Path, processes: int, steps: int, *extra: str) -> float:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    batch = str(GLOBAL_BATCH // processes)
    command = [sys.executable, str(WORKER), str(output_dir), "--batch-size", batch, "--steps", str(steps), *extra]
    if processes > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", str(WORKER)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def summary(output_dir: Path, steps: int, wall: float) -> dict:
    rank0 = json.loads((output_dir / "rank-0.json").read_text())
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [line["loss"] for line in lines if "loss" in line],
            "records_per_s": steps * GLOBAL_BATCH / rank0["train_seconds"], "wall_s": wall,
            "adapter": load_file(output_dir / "trainable.safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for processes in (1, 2):  # alternate A and B
                out = Path(tmp) / f"p{processes}-r{repeat}"
                wall = launch(out, processes, args.steps)
                runs[processes].append(summary(out, args.steps, wall))
        launch(Path(tmp) / "unsynced", 2, args.steps, "--no-module-sync")  # negative control
        unsynced = [json.loads((Path(tmp) / "unsynced" / f"rank-{r}.json").read_text())["sigma"] for r in (0, 1)]
        synced = [json.loads((Path(tmp) / "p2-r0" / f"rank-{r}.json").read_text())["sigma"] for r in (0, 1)]
        single = json.loads((Path(tmp) / "p1-r0" / "rank-0.json").read_text())["sigma"]
    one, two = runs[1][0], runs[2][0]
    loss_diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True))
    adapter_diff = max(float((one["adapter"][k] - two["adapter"][k]).abs().max()) for k in one["adapter"])
    speed = {p: statistics.median(r["records_per_s"] for r in runs[p]) for p in runs}
    wall = {p: statistics.median(r["wall_s"] for r in runs[p]) for p in runs}
    result = {
        "setup": {"model": "tiny random Llama (2 layers, hidden 32) + LoRA r=4 on q,v; learned loss weight",
                  "global_batch": GLOBAL_BATCH, "sequence_length": 12, "steps": args.steps,
                  "repeats": args.repeats, "threads_per_process": 1, "backend": "gloo (CPU)",
                  "launcher": "torch.distributed.run --standalone"},
        "loss_one_process": one["losses"], "loss_two_processes": two["losses"],
        "max_abs_loss_difference": loss_diff, "max_abs_adapter_difference": adapter_diff,
        "records_per_s": {"one_process": speed[1], "two_processes": speed[2]},
        "throughput_ratio_two_over_one": speed[2] / speed[1],
        "wall_s_per_launch": {"one_process": wall[1], "two_processes": wall[2]},
        "learned_weight_sigma": {"one_process": single, "two_processes_per_rank": synced,
                                 "without_module_grad_averaging_per_rank": unsynced},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ddp_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {s + 1} | {a:.6f} | {b:.6f} |" for s, (a, b) in
                     enumerate(zip(one["losses"], two["losses"], strict=True)))
    previous = (RESULTS / "ddp_cpu.md").read_text() if (RESULTS / "ddp_cpu.md").is_file() else ""
    kept = previous[previous.index(OBJECTIVES_MARKER):] if OBJECTIVES_MARKER in previous else ""
    (RESULTS / "ddp_cpu.md").write_text(
        "# One process vs two DDP processes on CPU (same global batch of 4)\n\n"
        f"{result['setup']['model']}; {args.steps} steps, {args.repeats} alternating repeats, gloo, 1 thread per process.\n\n"
        f"- largest loss-curve difference: {loss_diff:.2e}\n- largest adapter difference: {adapter_diff:.2e}\n"
        f"- throughput (records/s of step time, median): one {speed[1]:.1f}, two {speed[2]:.1f} "
        f"(ratio two/one {speed[2] / speed[1]:.2f})\n"
        f"- wall time per launch incl. start-up (median): one {wall[1]:.1f} s, two {wall[2]:.1f} s\n"
        f"- the objective's learned weight sigma after training: one process {single:.6f}; two processes "
        f"(rank 0, rank 1) {synced[0]:.6f}, {synced[1]:.6f}; negative control without averaging the "
        f"objective modules' gradients (the loop before issue 17): {unsynced[0]:.6f}, {unsynced[1]:.6f}\n\n"
        "On a shared 2-core machine the speed ratio is noise-dominated; DDP's gain is one process per GPU.\n\n"
        "| step | loss, 1 process | loss, 2 processes |\n|---:|---:|---:|\n" + rows + "\n"
        + ("\n" + kept if kept else ""))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("loss_")}, indent=2))


if __name__ == "__main__":
    main()
