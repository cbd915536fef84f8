"""Peak memory of DPO with LoRA and ``reference: base`` against SFT with LoRA on the same model and batch.

The claim: the DPO reference costs no second model — it is the same model with the adapter disabled.
Each case runs in a fresh subprocess (imports, build, LoRA, ``steps`` training steps through
``tunelab.train.train``) and reports its max RSS (``ru_maxrss``) and the training-phase high-water mark
(``VmHWM`` after ``/proc/self/clear_refs``); the median of ``--repeats`` processes is kept, with a fixed
glibc mmap threshold (as the LoRA-family benchmark does), so RSS tracks live tensors.

Cases, same model (tiny-llama's shape, random weights — memory does not depend on the values), same
B preference records per step:

- ``sft_pairs``: SFT on the 2B sequences of the batch (each pair's chosen and rejected as examples) —
  the same tokens through the same model as DPO's concatenated forward: the apples-to-apples case;
- ``sft``: SFT on the B chosen sequences (what an SFT run with the same batch size would hold);
- ``dpo_base``: DPO, ``reference: base`` (adapter disabled, no copy);
- ``dpo_sft_adapter``: DPO, ``reference: sft_adapter`` (a frozen copy of the LoRA tensors).

Usage: ``python benchmarks/align_memory.py [--steps 6 --batch 8 --repeats 3]``; writes
``benchmarks/results/align_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results"
CASES = ("sft_pairs", "sft", "dpo_base", "dpo_sft_adapter")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_case(case: str, steps: int, batch: int, max_length: int) -> dict:
    import torch

    from tunelab import tuners
    from tunelab.align import DPOObjective
    from tunelab.data import synthetic
    from tunelab.models import tiny
    from tunelab.objectives import SFTObjective
    from tunelab.train import train

    torch.set_num_threads(1)
    tokenizer = tiny.train_tokenizer(synthetic.corpus(domains=("medical",), n_documents=300, seed=0), 2000)
    model = tiny.build_model(tiny.PRESETS["tiny-llama"], tokenizer, seed=0)
    tuners.apply(model, "lora", r=16, lora_alpha=32, target_modules="all-linear")
    pairs = synthetic.make_task("preference", domain="medical", split="train", n=batch * steps, seed=0)
    if case.startswith("sft"):
        sides = ("chosen", "rejected") if case == "sft_pairs" else ("chosen",)
        records = [{"prompt": r["prompt"], "response": r[side]} for r in pairs for side in sides]
        objective, size = SFTObjective(), batch * len(sides)
    else:
        reference = case.removeprefix("dpo_")
        records, size = pairs, batch
        objective = DPOObjective(reference=reference, check_reference=False)
    objective.collator(tokenizer, None, max_length=max_length, template="plain")
    ready = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: training alone from here
    train(model, records, objective, {"max_steps": steps, "batch_size": size, "log_every": steps}, progress=False)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ready_rss_mb": ready,
            "training_peak_mb": status_mb("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(memory_case(args.case, args.steps, args.batch, args.max_length)))
        return
    from _timing import run_json

    results = {}
    for case in CASES:
        command = [sys.executable, __file__, "--case", case, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--max-length", str(args.max_length)]
        runs = [run_json(command, env={**os.environ, **MALLOC_ENV}) for _ in range(args.repeats)]
        results[case] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(case, results[case], flush=True)
    for case in ("dpo_base", "dpo_sft_adapter"):
        for baseline in ("sft_pairs", "sft"):
            results[case][f"peak_ratio_vs_{baseline}"] = results[case]["peak_rss_mb"] / results[baseline]["peak_rss_mb"]
    record = {"steps": args.steps, "batch_pairs": args.batch, "max_length": args.max_length,
              "repeats": args.repeats, "model": "tiny-llama shape (random), LoRA r=16 all-linear", "cases": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "align_memory.json").write_text(json.dumps(record, indent=2))
    lines = ["# DPO (LoRA, reference: base) peak memory vs SFT (LoRA)", "",
             f"tiny-llama shape, LoRA r=16 all-linear, {args.batch} pairs per step, {args.steps} steps, "
             f"median of {args.repeats} fresh processes.", "",
             "| case | peak RSS (MiB) | training high-water (MiB) | ready RSS (MiB) | peak / sft_pairs | peak / sft |",
             "|---|---|---|---|---|---|"]
    for case, r in results.items():
        ratios = [f"{r[k]:.3f}" if k in r else "" for k in ("peak_ratio_vs_sft_pairs", "peak_ratio_vs_sft")]
        lines.append(f"| {case} | {r['peak_rss_mb']:.0f} | {r['training_peak_mb']:.0f} | {r['ready_rss_mb']:.0f} | "
                     f"{ratios[0]} | {ratios[1]} |")
    (RESULTS / "align_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
