"""LoRA and DoRA: tunelab against HF PEFT on the same random model and the same adapter config.

Measured, per model (a tiny-llama-shaped Llama and a GPT-2-small-shaped GPT-2, both random) and
method (LoRA, DoRA; r = 8, alpha = 16, every linear layer of the blocks):

- training step time, ours / PEFT: forward + backward + AdamW step; several rounds, each in a fresh
  process that builds both sides (build order alternating) and times alternating steps; the median
  of the per-round ratios (``benchmarks/_timing.py`` says why one process is not enough);
- peak memory, ours / PEFT: each case in a fresh subprocess (the same imports in every case, so the
  baseline is equal), max RSS after a few training steps; also the increment over the loaded model;
- inference latency (eval, no grad): base model, ours unmerged, ours merged, PEFT unmerged, in
  fresh-process rounds (calls alternating within a round); merged / base is the "merging costs
  nothing" check;
- trainable parameter counts (must equal PEFT's);
- the DoRA norm alone: PEFT's dense ``||W + s B A||`` (identity trick, dense sum) against tunelab's
  factored formula, time and the size of the largest temporary.

Absolute times on a shared 2-core machine are noise; the ratios are what counts. Targets (the issue):
LoRA time and memory ratio <= 1.0, DoRA <= 0.8, merged latency within 2% of the base model.

    python benchmarks/bench_lora_family.py            # ~10 minutes on 2 busy cores
    python benchmarks/bench_lora_family.py --quick    # smaller step counts, for a smoke run

Writes ``benchmarks/results/lora_family.json`` and ``lora_family.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
RANK, ALPHA = 8, 16
TARGETS = {
    "tiny-llama-shape": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2-small-shape": ["c_attn", "c_proj", "c_fc"],
}
BATCH = {"tiny-llama-shape": (4, 128), "gpt2-small-shape": (1, 128)}  # (batch, sequence) per timed step
MEMORY_BATCH = {"tiny-llama-shape": (8, 512), "gpt2-small-shape": (4, 256)}  # larger: activations count
METHODS = ("lora", "dora")


# ------------------------------------------------------------------------------------------ models


def build_base(model_name: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_name == "tiny-llama-shape":
        config = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                             intermediate_size=688, vocab_size=2048, max_position_embeddings=512)
        return LlamaForCausalLM(config)
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # 124M: 12 layers, 768 wide
    return GPT2LMHeadModel(config)


def tune(base, model_name: str, impl: str, method: str):
    """Apply the same adapter with tunelab or PEFT (``impl``) to ``base`` (in place / wrapped)."""
    use_dora = method == "dora"
    if impl == "tunelab":
        from tunelab import tuners

        return tuners.apply(base, "lora", r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[model_name],
                            use_dora=use_dora)
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[model_name], use_dora=use_dora,
                             fan_in_fan_out=model_name.startswith("gpt2"))
    return peft.get_peft_model(base, config)


def make_batch(model_name: str, vocab: int, shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    batch, length = shape or BATCH[model_name]
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Trainer:
    """One model + AdamW; ``step()`` returns the wall time of forward + backward + update."""

    def __init__(self, model, batch) -> None:
        self.model, self.batch = model.train(), batch
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(self) -> float:
        started = time.perf_counter()
        self.model(**self.batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


# --------------------------------------------------------------------------------------- measures


def time_round(model_name: str, method: str, steps: int, order: list[str]) -> dict[str, float]:
    """One timing round (run in a fresh process): both sides built in ``order``; median step seconds."""
    from _timing import time_round as run_round

    base = build_base(model_name)
    batch = make_batch(model_name, base.config.vocab_size)
    builders = {impl: (lambda impl=impl: Trainer(tune(copy.deepcopy(base), model_name, impl, method), batch).step)
                for impl in ("tunelab", "peft")}
    return run_round(builders, order, steps)


def step_times(model_name: str, method: str, steps: int, rounds: int, threads: int) -> dict:
    """Median over ``rounds`` fresh processes of the per-round step-time ratio (see ``_timing``)."""
    from _timing import alternating_rounds, python_command

    base = build_base(model_name)
    counts = {impl: trainable_count(tune(copy.deepcopy(base), model_name, impl, method)) for impl in ("tunelab", "peft")}
    command = python_command(__file__, "--time-case", model_name, method, "--steps-timed", str(steps),
                             "--threads", str(threads))
    return {**alternating_rounds(command, rounds), "trainable": counts,
            "trainable_equal": counts["tunelab"] == counts["peft"], "steps": steps}


def _merged(model):
    from tunelab import tuners

    tuners.merge(model)
    return model


@torch.no_grad()
def latency_round(model_name: str, method: str, repeats: int, reverse: bool) -> dict[str, float]:
    """One latency round (a fresh process): median ms per eval forward of every variant.

    Variants: the base model, ours unmerged, ours merged (wrappers kept), ours merged and unloaded
    (bare modules), PEFT unmerged; every one is a deep copy of the same base, built in list order
    (reversed when ``reverse``), called in alternating order.
    """
    from tunelab import tuners

    original = build_base(model_name).eval()
    batch = {"input_ids": make_batch(model_name, original.config.vocab_size)["input_ids"]}
    builders = {
        "base": lambda: copy.deepcopy(original),
        "tunelab_unmerged": lambda: tune(copy.deepcopy(original), model_name, "tunelab", method),
        "tunelab_merged": lambda: _merged(tune(copy.deepcopy(original), model_name, "tunelab", method)),
        "tunelab_merged_unloaded": lambda: tuners.unload(tune(copy.deepcopy(original), model_name, "tunelab", method),
                                                         merge=True),
        "peft_unmerged": lambda: tune(copy.deepcopy(original), model_name, "peft", method),
    }
    names = list(builders)[::-1] if reverse else list(builders)
    variants = {name: builders[name]().eval() for name in names}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for model in variants.values():
        model(**batch)  # warm-up
    for index in range(repeats):
        for name in names if index % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            variants[name](**batch)
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def latencies(model_name: str, method: str, repeats: int, rounds: int, threads: int) -> dict:
    """Per-round latency ratios from fresh processes (build order alternating); medians over rounds."""
    from _timing import run_json

    command = [sys.executable, __file__, "--latency-case", model_name, method, "--repeats", str(repeats),
               "--threads", str(threads)]
    per_round = [run_json(command + (["--reverse"] if index % 2 else [])) for index in range(rounds)]

    def ratio(name: str, reference: str) -> float:
        return statistics.median(r[name] / r[reference] for r in per_round)

    ms = {name: statistics.median(r[name] for r in per_round) for name in per_round[0]}
    return {"latency_ms": ms, "merged_over_base": ratio("tunelab_merged", "base"),
            "merged_unloaded_over_base": ratio("tunelab_merged_unloaded", "base"),
            "unmerged_over_base": ratio("tunelab_unmerged", "base"),
            "unmerged_over_peft_unmerged": ratio("tunelab_unmerged", "peft_unmerged"),
            "merged_over_base_rounds": [r["tunelab_merged"] / r["base"] for r in per_round],
            "repeats": repeats, "latency_rounds": rounds}


def status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak since the last reset) of this process, MiB (Linux)."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def memory_case(model_name: str, impl: str, method: str, steps: int) -> dict:
    """Run in a fresh process: import everything, build, tune, train ``steps`` steps; report RSS.

    ``peak_rss_mb`` is the process maximum (``ru_maxrss``, what the target is about); the peak is reset
    (``/proc/self/clear_refs``) once the model is ready, so ``training_peak_mb`` is the peak of the
    training steps alone and ``training_peak_mb - ready_rss_mb`` their activations and temporaries.
    """
    import peft  # noqa: F401  every case imports the same libraries, so baselines are equal

    import tunelab.tuners  # noqa: F401

    torch.set_num_threads(1)
    base = build_base(model_name)
    model = tune(base, model_name, impl, method)
    trainer = Trainer(model, make_batch(model_name, base.config.vocab_size, MEMORY_BATCH[model_name]))
    ready = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        trainer.step()
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ready_rss_mb": ready, "training_peak_mb": status_mb("VmHWM")}


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # fixed threshold: freed large tensors go back to the OS


def memory_subprocess(model_name: str, impl: str, method: str, steps: int, repeats: int = 3) -> dict:
    """Median over ``repeats`` fresh processes (glibc's dynamic mmap threshold made single runs of the
    same case differ by up to 20 %; a fixed threshold and the median make RSS track live tensors)."""
    from _timing import run_json

    command = [sys.executable, __file__, "--memory-case", model_name, impl, method, "--steps", str(steps)]
    runs = [run_json(command, env={**os.environ, **MALLOC_ENV}) for _ in range(repeats)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def peak_memory_all(models: list[str], steps: int, workers: int) -> dict[tuple[str, str], dict]:
    """Every (model, method) case in fresh subprocesses (``workers`` at a time: RSS does not depend on timing)."""
    keys = [(model, impl, method) for model in models for method in METHODS for impl in ("tunelab", "peft")]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(keys, pool.map(lambda key: memory_subprocess(*key, steps), keys), strict=True))
    summary = {}
    for model in models:
        for method in METHODS:
            result = {impl: results[(model, impl, method)] for impl in ("tunelab", "peft")}
            peak = {impl: r["peak_rss_mb"] for impl, r in result.items()}
            training = {impl: r["training_peak_mb"] for impl, r in result.items()}
            over = {impl: r["training_peak_mb"] - r["ready_rss_mb"] for impl, r in result.items()}
            summary[(model, method)] = {"peak_rss_mb": peak, "memory_ratio": peak["tunelab"] / peak["peft"],
                                        "training_peak_mb": training,
                                        "training_peak_ratio": training["tunelab"] / training["peft"],
                                        "training_increment_mb": over,
                                        "increment_ratio": over["tunelab"] / over["peft"],
                                        "memory_batch": MEMORY_BATCH[model]}
    return summary


def dora_norm_case(d_out: int, d_in: int, repeats: int) -> dict:
    """PEFT's dense norm (identity trick) vs the factored one for one ``(out, in)`` layer shape."""
    from peft.tuners.lora.dora import DoraLinearLayer

    from tunelab.tuners.lora.dora import row_norm

    generator = torch.Generator().manual_seed(0)
    W = torch.randn(d_out, d_in, generator=generator) * 0.02
    lora_A, lora_B = torch.nn.Linear(d_in, RANK, bias=False), torch.nn.Linear(RANK, d_out, bias=False)
    torch.nn.init.normal_(lora_B.weight, std=0.02)
    dense_layer = DoraLinearLayer(fan_in_fan_out=False)
    weight_sq = W.pow(2).sum(1)  # cached across steps in tunelab (W is frozen)

    @torch.no_grad()
    def dense():
        return dense_layer.get_weight_norm(W, dense_layer.get_lora_weight(lora_A, lora_B), ALPHA / RANK)

    def factored():
        return row_norm(W, lora_A.weight, lora_B.weight, ALPHA / RANK, weight_sq)

    error = (dense() - factored()).abs().max().item() / dense().abs().max().item()
    times: dict[str, list[float]] = {"peft_dense": [], "tunelab_factored": []}
    pairs = [("peft_dense", dense), ("tunelab_factored", factored)]
    for index in range(repeats):
        for name, fn in pairs if index % 2 == 0 else pairs[::-1]:
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    temporary = {"peft_dense": 4 * (d_in * d_in + 2 * d_in * d_out), "tunelab_factored": 4 * (RANK * d_out + RANK**2)}
    return {"shape": [d_out, d_in], "ms": ms, "time_ratio": ms["tunelab_factored"] / ms["peft_dense"],
            "largest_temporaries_bytes": temporary, "relative_difference": error}


def dora_norm(repeats: int) -> list[dict]:
    """The norm alone on GPT-2-small layer shapes (c_attn, mlp c_proj, c_fc)."""
    return [dora_norm_case(d_out, d_in, repeats) for d_out, d_in in ((2304, 768), (768, 3072), (3072, 768))]


# ---------------------------------------------------------------------------------------- report


def markdown(record: dict) -> str:
    lines = ["# LoRA family: tunelab vs HF PEFT", "",
             f"torch {record['versions']['torch']}, peft {record['versions']['peft']}, "
             f"{record['versions']['threads']} threads, {record['versions']['machine']}. "
             f"r = {RANK}, alpha = {ALPHA}, every linear layer of the blocks. Ratios are ours / PEFT "
             "(lower is better). Step time: median over fresh-process rounds of the per-round ratio "
             "(each round: both sides built, build order alternating, median of alternating steps); "
             "latency: median over fresh-process rounds of the per-round ratio (alternating calls within a round); "
             "memory: median of 3 fresh processes per case.", "",
             "| model | method | step time ratio | peak RSS ratio (process) | training-phase peak ratio | "
             "training increment ratio | trainable (ours = PEFT) | merged / base latency | "
             "merged + unloaded / base | unmerged / base | unmerged ours / PEFT |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in record["cases"]:
        target = 1.0 if row["method"] == "lora" else 0.8
        mark = {True: f"met (<= {target})", False: f"**missed** (> {target})"}
        increment = row["training_increment_mb"]
        lines.append(
            f"| {row['model']} | {row['method']} | {row['time_ratio']:.3f} ({row['step_ms']['tunelab']:.0f} / "
            f"{row['step_ms']['peft']:.0f} ms), {mark[row['time_ratio'] <= target]} | {row['memory_ratio']:.3f} "
            f"({row['peak_rss_mb']['tunelab']:.0f} / {row['peak_rss_mb']['peft']:.0f} MB), "
            f"{mark[row['memory_ratio'] <= target]} | {row['training_peak_ratio']:.3f} | {row['increment_ratio']:.3f} "
            f"({increment['tunelab']:.0f} / {increment['peft']:.0f} MB) | {row['trainable']['tunelab']:,} "
            f"({'yes' if row['trainable_equal'] else 'NO'}) | {row['merged_over_base']:.3f} | "
            f"{row['merged_unloaded_over_base']:.3f} | {row['unmerged_over_base']:.3f} | "
            f"{row['unmerged_over_peft_unmerged']:.3f} |")
    shapes = ", ".join(f"{m} {b}x{t}" for m, (b, t) in MEMORY_BATCH.items())
    timed = ", ".join(f"{m} {b}x{t}" for m, (b, t) in BATCH.items())
    lines += ["", f"Timed steps use batch x tokens {timed}; memory runs use {shapes} (one training step, "
              "after the model is loaded the peak is reset for the training-phase columns).", "",
              f"Load average when the run ended: {record['versions'].get('load_average', ['?'])[0]:.2f} on 2 cores. "
              "Per-round step-time ratios (the spread is the measurement noise): "
              + "; ".join(f"{row['model']} {row['method']} " + ", ".join(f"{r:.3f}" for r in row["round_ratios"])
                          for row in record["cases"]) + ".", "",
              "The process peak RSS includes the frozen weights and the libraries, identical for both "
              "implementations. DoRA changes only the training increment: tunelab keeps the layer output for "
              "backward (shared with the next operation's saved input) instead of PEFT's two (tokens, out) "
              "tensors, and builds no dense out x in temporaries for the norm. Merged latency uses tunelab's "
              "wrappers with the adapters folded in; merge + unload gives the bare base modules back."]
    lines += ["", "DoRA weight norm alone (GPT-2-small shapes, r = 8): PEFT's dense formula vs tunelab's factored one.",
              "", "| shape (out, in) | time ratio ours / PEFT | PEFT ms | ours ms | largest temporaries PEFT / ours |"
              " relative difference |", "|---|---|---|---|---|---|"]
    for row in record["dora_norm"]:
        temporary = row["largest_temporaries_bytes"]
        lines.append(f"| {tuple(row['shape'])} | {row['time_ratio']:.3f} | {row['ms']['peft_dense']:.2f} | "
                     f"{row['ms']['tunelab_factored']:.2f} | {temporary['peft_dense'] / 2**20:.1f} MiB / "
                     f"{temporary['tunelab_factored'] / 2**10:.1f} KiB | {row['relative_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-case", nargs=3, metavar=("MODEL", "IMPL", "METHOD"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(TARGETS))
    parser.add_argument("--threads", type=int, default=1,
                        help="1: on a shared, overloaded box two threads made steps 5-20x slower and erratic")
    parser.add_argument("--steps-timed", type=int, default=12, help="timed training steps per side and round")
    parser.add_argument("--memory-workers", type=int, default=4, help="memory subprocesses at a time")
    parser.add_argument("--large-divisor", type=int, default=2,
                        help="GPT-2-small shape: timed steps and latency repeats divided by this (1: as many as tiny)")
    parser.add_argument("--rounds", type=int, default=6, help="fresh processes per step-time comparison")
    parser.add_argument("--time-case", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--time-round", help=argparse.SUPPRESS)
    parser.add_argument("--latency-case", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=21, help="latency calls per variant and round")
    parser.add_argument("--reverse", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(memory_case(*args.memory_case, steps=args.steps)))
        return
    torch.set_num_threads(args.threads)
    if args.time_round:
        print(json.dumps(time_round(*args.time_case, args.steps_timed, args.time_round.split(","))))
        return
    if args.latency_case:
        print(json.dumps(latency_round(*args.latency_case, args.repeats, args.reverse)))
        return
    import peft

    steps, repeats = (3, 5) if args.quick else (args.steps_timed, args.repeats)
    started = time.perf_counter()
    memory = peak_memory_all(args.models, steps=1, workers=args.memory_workers)
    print(f"peak memory of {2 * len(memory)} subprocesses: {time.perf_counter() - started:.0f} s", flush=True)
    cases = []
    for model_name in args.models:
        small = model_name.startswith("tiny")
        for method in METHODS:
            started = time.perf_counter()
            row = {"model": model_name, "method": method}
            row.update(step_times(model_name, method, steps if small else max(3, steps // args.large_divisor),
                                  3 if args.quick else args.rounds, args.threads))
            row.update(latencies(model_name, method, repeats if small else max(5, repeats // args.large_divisor),
                                 3 if args.quick else args.rounds, args.threads))
            row.update(memory[(model_name, method)])
            print(f"{model_name} {method}: time {row['time_ratio']:.3f}, memory {row['memory_ratio']:.3f}, "
                  f"merged/base {row['merged_over_base']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
            cases.append(row)
    record = {"benchmark": "lora_family", "rank": RANK, "lora_alpha": ALPHA, "cases": cases,
              "dora_norm": dora_norm(30),
              "versions": {"torch": torch.__version__, "peft": peft.__version__, "threads": args.threads,
                           "python": platform.python_version(), "machine": platform.machine(),
                           "load_average": os.getloadavg()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora_family.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "lora_family.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
