"""Prompt tuning and prefix tuning: tunelab vs HF PEFT, training step time and peak memory.

Both sides train the same adapter (same geometry, same seeded base model) on the same batches of a
random Llama (causal LM loss). Target: ratio (tunelab / PEFT) <= 1.0 for both.

- Step time: ``--rounds`` fresh processes; each builds both sides (the build order alternates between
  rounds) and times ``--steps`` alternating optimizer steps per side; the reported ratio is the median
  over rounds of ``median(tunelab) / median(PEFT)`` (``benchmarks/_timing.py`` says why one process
  is not enough).
- Peak memory: each case runs in a fresh subprocess that builds the model, applies the method and
  trains; it reports ``ru_maxrss`` (peak RSS) and the peak above the RSS measured just before training
  (what the method adds). Both sides import torch, transformers, peft and tunelab, so the baselines
  match.

    python benchmarks/bench_prompt_methods.py [--rounds 6 --steps 12 --threads 1]

Writes ``benchmarks/results/bench_prompt_methods.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {  # name -> (tunelab method, options)
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 20}),
    "prefix_tuning": ("prefix_tuning", {"num_virtual_tokens": 20}),
    "prefix_tuning+projection": ("prefix_tuning", {"num_virtual_tokens": 20, "prefix_projection": True,
                                                   "encoder_hidden_size": 128}),
}
SHAPE = {"vocab": 2000, "hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4, "batch": 8, "seq": 128}


def build_base():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=4 * SHAPE["hidden"],
                         num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                         num_key_value_heads=SHAPE["kv_heads"], max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def batch():
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make(side: str, case: str, base):
    """(model, optimizer) for one side; PEFT gets the same options under its own config class."""
    import peft
    import torch

    from tunelab import tuners

    method, options = CASES[case]
    model = copy.deepcopy(base)
    if side == "tunelab":
        tuners.apply(model, method, **options)
    else:
        config_class = peft.PromptTuningConfig if method == "prompt_tuning" else peft.PrefixTuningConfig
        model = peft.get_peft_model(model, config_class(task_type="CAUSAL_LM", **options))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def run_steps(model, optimizer, data: dict, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def status_mib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak since start or the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5), so the peak covers training only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(side: str, case: str, steps: int, threads: int) -> None:
    """Subprocess body: build, apply, train; print the process peak RSS and the training peak above the
    RSS just before training (MiB). Imports and model building peak identically on both sides, so the
    training peak is read after resetting the high-water mark (``ru_maxrss`` when that is not allowed)."""
    import peft  # noqa: F401  (both sides import the same libraries)
    import torch

    import tunelab.tuners  # noqa: F401

    torch.set_num_threads(threads)
    model, optimizer = make(side, case, build_base())
    data = batch()
    before = status_mib("VmRSS")
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    was_reset = reset_peak()
    run_steps(model, optimizer, data, steps)
    training_peak = status_mib("VmHWM") if was_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": max(process_peak, training_peak), "training_peak_mib": training_peak,
                      "training_mib": training_peak - before, "peak_reset": was_reset}))


def measure_memory(case: str, steps: int, threads: int) -> dict:
    from _timing import run_json

    out = {}
    for side in ("tunelab", "peft"):
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_prompt_methods as b; "
                f"b.memory_child({side!r}, {case!r}, {steps}, {threads})")
        out[side] = run_json([sys.executable, "-c", code])
    return out


def time_round(case: str, steps: int, order: list[str]) -> dict[str, float]:
    """One timing round (a fresh process): both sides built in ``order``; median seconds per step."""
    from _timing import time_round as run_round

    base, data = build_base(), batch()

    def builder(side: str):
        model, optimizer = make(side, case, base)
        return lambda: run_steps(model, optimizer, data, 1)

    return run_round({side: (lambda side=side: builder(side)) for side in ("tunelab", "peft")}, order, steps)


def measure_time(case: str, rounds: int, steps: int, threads: int) -> dict:
    """Median over ``rounds`` fresh processes of the per-round step-time ratio (see ``_timing``)."""
    from _timing import alternating_rounds, python_command

    result = alternating_rounds(python_command(__file__, "--time-case", case, "--steps", str(steps),
                                               "--threads", str(threads)), rounds)
    return {"median_ratio": result["time_ratio"], "ratios": result["round_ratios"],
            "tunelab_step_s": result["step_ms"]["tunelab"] / 1000, "peft_step_s": result["step_ms"]["peft"] / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="fresh processes per step-time comparison")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side and round")
    parser.add_argument("--memory-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-only", action="store_true",
                        help="re-measure memory only, keeping the step times of the existing results file")
    parser.add_argument("--time-case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--time-round", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    if args.time_round:
        print(json.dumps(time_round(args.time_case, args.steps, args.time_round.split(","))))
        return
    results = {"shape": SHAPE, "rounds": args.rounds, "steps_per_round": args.steps, "threads": args.threads,
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__}, "cases": {}}
    previous = json.loads((RESULTS / "bench_prompt_methods.json").read_text()) if args.memory_only else None
    if previous:
        results.update({key: previous[key] for key in ("rounds", "steps_per_round")})
    for case in CASES:
        timing = previous["cases"][case]["time"] if previous else measure_time(case, args.rounds, args.steps, args.threads)
        memory = measure_memory(case, args.memory_steps, args.threads)
        results["cases"][case] = {"time": timing, "memory": memory,
                                  "peak_ratio": memory["tunelab"]["peak_mib"] / memory["peft"]["peak_mib"],
                                  "training_peak_ratio": memory["tunelab"]["training_peak_mib"]
                                  / memory["peft"]["training_peak_mib"],
                                  "training_memory_ratio": memory["tunelab"]["training_mib"]
                                  / max(memory["peft"]["training_mib"], 1e-9)}
        print(case, json.dumps({k: results["cases"][case][k] for k in ("training_peak_ratio", "training_memory_ratio")}),
              "time ratio", round(timing["median_ratio"], 3), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_prompt_methods.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "bench_prompt_methods.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    shape = results["shape"]
    lines = [
        "# Prompt and prefix tuning: tunelab vs HF PEFT",
        "",
        f"Random Llama (hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} heads / "
        f"{shape['kv_heads']} KV heads, vocab {shape['vocab']}), batch {shape['batch']} x {shape['seq']} tokens, "
        f"causal-LM loss + AdamW, {results['threads']} threads; {results['versions']}.",
        f"Step time: median over {results['rounds']} rounds of the per-round ratio; each round is a fresh process "
        f"that builds both sides (build order alternating) and times {results['steps_per_round']} alternating steps "
        "per side (median). Memory: fresh subprocess per side; training peak = peak RSS during training (high-water "
        "mark reset just before it), training memory = that peak minus the RSS before training.",
        "",
        "Per-round step-time ratios: " + "; ".join(f"{case} " + ", ".join(f"{r:.3f}" for r in row["time"]["ratios"])
                                                   for case, row in results["cases"].items()) + ".",
        "",
        "| case | step time ratio (tunelab/PEFT) | tunelab s/step | PEFT s/step | training peak RSS ratio | "
        "training-memory ratio | tunelab training peak / +MiB | PEFT training peak / +MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, row in results["cases"].items():
        timing, ours, theirs = row["time"], row["memory"]["tunelab"], row["memory"]["peft"]
        lines.append(f"| {case} | {timing['median_ratio']:.3f} | {timing['tunelab_step_s']:.4f} | "
                     f"{timing['peft_step_s']:.4f} | {row['training_peak_ratio']:.3f} | "
                     f"{row['training_memory_ratio']:.3f} | {ours['training_peak_mib']:.0f} / "
                     f"{ours['training_mib']:.0f} | {theirs['training_peak_mib']:.0f} / {theirs['training_mib']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
