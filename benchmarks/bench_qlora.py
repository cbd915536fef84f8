"""QLoRA benchmark: tunelab's NF4 QLoRA against HF PEFT LoRA over bitsandbytes ``Linear4bit``.

Per model shape (a tiny-llama-shaped Llama and a GPT-2-small-shaped random model):

- weight bytes: fp32, bf16, tunelab NF4 (double quant) and bitsandbytes Linear4bit (double quant),
  counted from the stored tensors (tied weights once);
- training step time, ours / PEFT: same base weights, LoRA r=8 on every linear layer but the head,
  same batch, AdamW; ``--rounds`` fresh processes, each building both sides (build order alternating)
  and timing ``--steps`` alternating steps; the median of the per-round ratios of medians
  (``benchmarks/_timing.py`` says why one process is not enough);
- peak memory, ours / PEFT: each case in a fresh subprocess; ``VmHWM`` (peak RSS) is reset after the
  model is built and quantized, so the number is the training peak (also reported: process max RSS);
- trainable parameter counts (must be equal).

``--quality`` also fine-tunes the pretrained tiny-llama on medical summarization with LoRA (fp32 base)
and QLoRA (NF4 base), same config, and reports ROUGE-L on held-out records.

    python benchmarks/bench_qlora.py [--rounds 6] [--steps 10] [--quality]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
LORA = {"r": 8, "lora_alpha": 16}


def build(shape: str, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if shape == "tiny-llama-shape":
        config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                             tie_word_embeddings=False)
        return LlamaForCausalLM(config)
    return GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # ~124M


def batch_for(model: torch.nn.Module, batch_size: int = 4, seq_len: int = 128) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def ours(model: torch.nn.Module) -> torch.nn.Module:
    from tunelab import tuners

    return tuners.apply(model, "qlora", **LORA, double_quant=True, compute_dtype="float32")


def peft_bnb(model: torch.nn.Module) -> torch.nn.Module:
    """Every Linear/Conv1D but the head -> bnb Linear4bit (nf4, double quant, fp32 compute), then PEFT LoRA."""
    import bitsandbytes as bnb
    import peft
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    for path, module in [(p, m) for p, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]:
        if module is head:
            continue
        weight = module.weight.data.T if isinstance(module, Conv1D) else module.weight.data  # (out, in)
        layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.contiguous().clone(), requires_grad=False, quant_type="nf4",
                                         blocksize=64, compress_statistics=True)
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to("cpu"))  # .to quantizes
    model.requires_grad_(False)
    return peft.get_peft_model(model, peft.LoraConfig(**LORA, target_modules="all-linear"))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters, buffers and bnb quant states, each storage once (tied weights)."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def nf4_bits(model: torch.nn.Module) -> float:
    """Bits per weight of the quantized layers, from their stored tensors."""
    from tunelab.quant import NF4Linear

    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return 8 * sum(m.nbytes for m in layers) / sum(m.in_features * m.out_features for m in layers)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step_fn(model: torch.nn.Module, batch: dict):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> float:
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return step


def time_round(shape: str, batch_size: int, steps: int, order: list[str]) -> dict[str, float]:
    """One timing round (a fresh process): both sides built in ``order``; median seconds per step."""
    import copy

    from _timing import time_round as run_round

    base = build(shape)

    def builder(side: str):
        model = ours(copy.deepcopy(base)) if side == "tunelab" else peft_bnb(copy.deepcopy(base))
        return step_fn(model, batch_for(model, batch_size))

    return run_round({side: (lambda side=side: builder(side)) for side in ("tunelab", "peft")}, order, steps)


def compare_time(shape: str, rounds: int, batch_size: int, steps: int) -> dict:
    """Sizes and trainable counts here; step time as the median of fresh-process rounds (``_timing``)."""
    from _timing import alternating_rounds, python_command

    base = build(shape)
    fp32_bytes = weight_bytes(base)
    import copy

    a, b = ours(copy.deepcopy(base)), peft_bnb(base)
    timing = alternating_rounds(python_command(__file__, "--time-case", shape, str(batch_size), "--steps",
                                               str(steps)), rounds)
    return {
        "trainable_tunelab": trainable(a), "trainable_peft": trainable(b),
        "nf4_bits_per_parameter": nf4_bits(a),
        "bytes": {"fp32": fp32_bytes, "bf16": fp32_bytes // 2, "tunelab_nf4": weight_bytes(a),
                  "bnb_linear4bit": weight_bytes(b)},
        "median_step_seconds": {side: ms / 1000 for side, ms in timing["step_ms"].items()},
        "round_ratios": timing["round_ratios"], "time_ratio": timing["time_ratio"],
        "tokens_per_step": batch_for(a, batch_size)["input_ids"].numel(),
    }


def memory_case(shape: str, case: str, batch_size: int, steps: int = 3) -> dict:
    """Runs in a subprocess: build, quantize, reset the peak, train ``steps`` steps, report peaks."""
    torch.set_num_threads(THREADS)
    model = (ours if case == "tunelab" else peft_bnb)(build(shape))
    import gc

    gc.collect()
    setup_peak_kib = _vm_hwm_kib()  # this process's own peak so far (ru_maxrss would include the parent's)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    step = step_fn(model, batch_for(model, batch_size))
    for _ in range(steps):
        step()
    train_peak_kib = _vm_hwm_kib()
    return {"train_peak_rss_mib": train_peak_kib / 1024,
            "process_max_rss_mib": max(setup_peak_kib, train_peak_kib) / 1024}


def _vm_hwm_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def compare_memory(shape: str, batch_size: int) -> dict:
    from _timing import run_json

    result = {}
    for case in ("tunelab", "peft"):
        result[case] = run_json([sys.executable, __file__, "--memory-case", shape, case, str(batch_size)])
    result["train_peak_ratio"] = result["tunelab"]["train_peak_rss_mib"] / result["peft"]["train_peak_rss_mib"]
    result["process_max_ratio"] = result["tunelab"]["process_max_rss_mib"] / result["peft"]["process_max_rss_mib"]
    return result


def quality(steps: int, n_train: int, n_eval: int) -> dict:
    """LoRA on the fp32 pretrained tiny-llama vs QLoRA on its NF4 copy: medical summarization, ROUGE-L."""
    from tunelab import tuners
    from tunelab.data import collate, synthetic
    from tunelab.eval import evaluate_task
    from tunelab.models import zoo
    from tunelab.train import TrainConfig, train

    train_records = synthetic.make_task("summarization", domain="medical", split="train", n=n_train, seed=0)
    eval_records = synthetic.make_task("summarization", domain="medical", split="test", n=n_eval, seed=0)
    scores = {}
    for method in ("lora", "qlora"):
        model, tokenizer = zoo.load("tiny-llama", progress=False)
        before = evaluate_task(model, tokenizer, eval_records, eval_records[0]["kind"], progress=False) if method == "lora" else None
        torch.manual_seed(0)
        tuners.apply(model, method, r=8, lora_alpha=16, target_modules="all-linear")
        config = TrainConfig(learning_rate=2e-3, max_steps=steps, batch_size=8, schedule="cosine", warmup_ratio=0.05,
                             eval_every=None, save_every=None, log_every=50, seed=0)
        result = train(model, train_records, collate.SFTCollator(tokenizer, max_length=256), config, progress=False)
        metrics = evaluate_task(model, tokenizer, eval_records, eval_records[0]["kind"], progress=False)
        scores[method] = {"rouge_l": metrics["score"], "final_train_loss": result.history[-1]["loss"],
                          "train_seconds": result.train_seconds}
        if before is not None:
            scores["pretrained_no_tuning"] = {"rouge_l": before["score"]}
    return {"task": "summarization/medical", "steps": steps, "n_train": n_train, "n_eval": n_eval, **scores}


def markdown(results: dict) -> str:
    mib = 1024 * 1024
    lines = ["# QLoRA: tunelab NF4 vs HF PEFT + bitsandbytes Linear4bit", "",
             f"CPU, {THREADS} threads, LoRA r={LORA['r']} on every linear layer but the head, double quantization, "
             "fp32 compute. Ratios are ours / PEFT: step time is the median over fresh-process rounds of the per-round "
             "ratio (each round builds both sides, build order alternating, and times alternating steps); memory is "
             "the peak RSS of a fresh subprocess during training.", "",
             "Weight MiB are the whole model (embeddings and head stay fp32); bits/weight counts the quantized "
             "layers only.", "",
             "| model | fp32 MiB | bf16 MiB | tunelab NF4 MiB | bnb Linear4bit MiB | NF4 bits/weight "
             "| trainable (ours / PEFT) | step time ratio | train peak RSS ratio | process max RSS ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, entry in results["models"].items():
        sizes = entry["bytes"]
        lines.append(f"| {shape} | {sizes['fp32'] / mib:.1f} | {sizes['bf16'] / mib:.1f} | "
                     f"{sizes['tunelab_nf4'] / mib:.1f} | {sizes['bnb_linear4bit'] / mib:.1f} | "
                     f"{entry.get('nf4_bits_per_parameter', float('nan')):.3f} | "
                     f"{entry['trainable_tunelab']:,} / {entry['trainable_peft']:,} | {entry['time_ratio']:.2f} | "
                     f"{entry['memory']['train_peak_ratio']:.2f} | {entry['memory']['process_max_ratio']:.2f} |")
    rounds = [f"{shape} " + ", ".join(f"{r:.3f}" for r in entry["round_ratios"])
              for shape, entry in results["models"].items() if "round_ratios" in entry]
    if rounds:
        lines += ["", "Per-round step-time ratios (the spread is the measurement noise): " + "; ".join(rounds) + "."]
    if "quality" in results:
        q = results["quality"]
        lines += ["", f"## Quality: {q['task']}, pretrained tiny-llama, {q['steps']} steps, "
                      f"{q['n_train']} train / {q['n_eval']} held-out records", "",
                  "| setup | ROUGE-L | final train loss |", "|---|---|---|",
                  f"| no tuning | {q['pretrained_no_tuning']['rouge_l']:.3f} | |",
                  f"| LoRA (fp32 base) | {q['lora']['rouge_l']:.3f} | {q['lora']['final_train_loss']:.3f} |",
                  f"| QLoRA (NF4 base) | {q['qlora']['rouge_l']:.3f} | {q['qlora']['final_train_loss']:.3f} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="fresh processes per step-time comparison")
    parser.add_argument("--models", nargs="*", default=["tiny-llama-shape", "gpt2-small-shape"])  # none: --quality only
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quality-steps", type=int, default=150)
    parser.add_argument("--memory-case", nargs=3, metavar=("SHAPE", "CASE", "BATCH"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    parser.add_argument("--time-case", nargs=2, metavar=("SHAPE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--time-round", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        shape, case, batch_size = args.memory_case
        print(json.dumps(memory_case(shape, case, int(batch_size))))
        return
    torch.set_num_threads(THREADS)
    if args.time_round:
        shape, batch_size = args.time_case
        print(json.dumps(time_round(shape, int(batch_size), args.steps, args.time_round.split(","))))
        return
    results_path = RESULTS / "qlora.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"models": {}}
    results["environment"] = {"torch": torch.__version__, "threads": THREADS, "bitsandbytes": _version("bitsandbytes"),
                              "peft": _version("peft")}
    for shape in args.models:
        batch_size = 4 if shape == "tiny-llama-shape" else 2
        entry = compare_time(shape, args.rounds, batch_size, args.steps)
        entry["memory"] = compare_memory(shape, batch_size)
        results["models"][shape] = entry
        print(shape, json.dumps({k: entry[k] for k in ("time_ratio", "trainable_tunelab", "trainable_peft")}),
              json.dumps(entry["memory"]), flush=True)
    if args.quality:
        results["quality"] = quality(args.quality_steps, n_train=400, n_eval=64)
        print(json.dumps(results["quality"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2))
    (RESULTS / "qlora.md").write_text(markdown(results))
    print(markdown(results))


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
