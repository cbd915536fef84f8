"""(IA)³: tunelab vs HF PEFT, training step time and peak memory (ratios ours / PEFT; target ≤ 1.0).

The same random Llama (from a config, no download: hidden 256, 4 layers, vocabulary 4000), the same
(IA)³ defaults (keys, values, down projection as feed-forward), the same batch and AdamW. Step time:
both models in one process, steps alternating A, B, A, B ..., median of each. Peak memory: each case
in a fresh subprocess that runs a few steps and reports its own max RSS (both import the same
libraries, peft included, so the baseline is the same). Writes ``results/bench_ia3.{json,md}``.

    python benchmarks/bench_ia3.py [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, SEQ = 8, 128


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def build(kind: str, base):
    import peft

    from tunelab import tuners

    model = copy.deepcopy(base)
    if kind == "tunelab":
        tuners.apply(model, "ia3")
    else:
        model = peft.get_peft_model(model, peft.IA3Config(task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 4000, (BATCH, SEQ), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def step(model, optimizer, inputs: dict) -> float:
    start = time.perf_counter()
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def memory_child(kind: str, steps: int, threads: int) -> None:
    """Subprocess entry: build one case, run ``steps`` steps, print its max RSS (KiB)."""
    torch.set_num_threads(threads)
    model, optimizer = build(kind, base_model())
    inputs = batch()
    for _ in range(steps):
        step(model, optimizer, inputs)
    print(json.dumps({"kind": kind, "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_memory(kind: str, steps: int, threads: int) -> int:
    from _timing import run_json

    return run_json([sys.executable, __file__, "--memory-child", kind, "--steps", str(steps),
                     "--threads", str(threads)])["max_rss_kib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-child", choices=["tunelab", "peft"])
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.memory_steps, args.threads)
        return
    torch.set_num_threads(args.threads)
    base = base_model()
    cases = {kind: build(kind, base) for kind in ("tunelab", "peft")}
    trainable = {kind: sum(p.numel() for p in m.parameters() if p.requires_grad) for kind, (m, _) in cases.items()}
    assert trainable["tunelab"] == trainable["peft"], trainable
    inputs = batch()
    times: dict[str, list[float]] = {"tunelab": [], "peft": []}
    for index in range(args.steps + 2):  # 2 warm-up pairs
        order = ("tunelab", "peft") if index % 2 == 0 else ("peft", "tunelab")
        for kind in order:
            elapsed = step(*cases[kind], inputs)
            if index >= 2:
                times[kind].append(elapsed)
    memory = {"tunelab": [], "peft": []}
    for _ in range(args.memory_runs):  # alternate the subprocesses too
        for kind in ("tunelab", "peft"):
            memory[kind].append(peak_memory(kind, args.memory_steps, args.threads))
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    rss = {kind: statistics.median(values) for kind, values in memory.items()}
    ratios = [a / b for a, b in zip(times["tunelab"], times["peft"], strict=True)]
    result = {"trainable_parameters": trainable["tunelab"], "median_step_seconds": medians,
              "step_time_ratio": medians["tunelab"] / medians["peft"], "median_pairwise_ratio": statistics.median(ratios),
              "peak_rss_kib": rss, "peak_memory_ratio": rss["tunelab"] / rss["peft"], "args": vars(args),
              "setup": f"random Llama d=256 L=4 vocab 4000, batch {BATCH}x{SEQ}, IA3 defaults, AdamW",
              "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_ia3.json").write_text(json.dumps(result, indent=2))
    table = "\n".join([
        "# (IA)³: tunelab vs HF PEFT", "",
        f"{result['setup']}; {args.steps} alternating steps each (median), {args.threads} thread; peak RSS median of "
        f"{args.memory_runs} fresh subprocesses x {args.memory_steps} steps. Ratios are ours / PEFT (target ≤ 1.0).", "",
        "| metric | tunelab | PEFT | ratio |", "|---|---:|---:|---:|",
        f"| step time (s, median) | {medians['tunelab']:.4f} | {medians['peft']:.4f} | {result['step_time_ratio']:.3f} |",
        f"| peak RSS (MiB) | {rss['tunelab'] / 1024:.0f} | {rss['peft'] / 1024:.0f} | {result['peak_memory_ratio']:.3f} |",
        f"| trainable parameters | {trainable['tunelab']:,} | {trainable['peft']:,} | 1.000 |", "",
        f"Median of per-pair ratios: {result['median_pairwise_ratio']:.3f}.", ""])
    (RESULTS / "bench_ia3.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
