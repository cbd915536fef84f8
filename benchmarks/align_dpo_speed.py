"""DPO step time, tunelab against TRL's ``DPOTrainer``: LoRA, reference = the base model (adapter disabled).

The issue's target: DPO with LoRA and ``reference: base`` takes at most 1.0x the step time of TRL's
``DPOTrainer`` with the same PEFT config. Both sides train the same thing through their real trainers:

- **model**: tiny-llama's shape (``tunelab.models.tiny.PRESETS["tiny-llama"]``: 4 layers, hidden 256, vocab
  2048, tied embeddings), random weights built by ``tiny.build_model`` with seed 0 — the same weights on
  both sides; the shipped tiny-llama tokenizer (``src/tunelab/models/weights/tiny-llama``, offline);
- **adapter**: LoRA r 16, alpha 32, dropout 0, on q/k/v/o/gate/up/down of every block (the same module
  list on both sides; tunelab's ``tuners.apply(model, "lora", ...)``, PEFT's ``LoraConfig`` handed to
  ``DPOTrainer(peft_config=...)``); the trainable parameter counts are checked equal;
- **data**: ``B`` preference pairs per step (default 8) of fixed lengths: a prompt of ``--prompt-tokens``
  (64) and completions of ``--completion-tokens`` (32, the last one EOS), made of words that are one token
  each, so every row is exactly 96 tokens and neither side pads; the batches are taken in order (TRL
  ``train_sampling_strategy="sequential"``, tunelab a sequential sampler), so step ``i`` sees the same
  pairs on both sides;
- **per step, both sides**: one forward of the 2B concatenated rows (chosen then rejected) with gradient,
  one no-grad forward of the same rows with the adapter disabled (tunelab ``reference: base`` =
  ``tuners.disabled``, TRL with a PEFT model and no ``ref_model`` = ``disable_adapter()``), the sigmoid
  loss with beta 0.1 on summed completion log-probs, backward, gradient clipping at norm 1.0, one AdamW
  step (``torch.optim.AdamW``, lr 5e-4, betas 0.9/0.999, eps 1e-8, no weight decay, non-fused: TRL
  ``optim="adamw_torch"``), constant learning rate, no gradient accumulation, fp32 (TRL: ``bf16=False``,
  ``gradient_checkpointing=False``, both TRL defaults otherwise), dropout off, no reference precompute
  (``precompute_ref_log_probs=False``), no logging to disk, saving, evaluation or progress bars.

What each side's step contains beyond that is its own real code path: TRL's fused LM head (log-probs in
chunks, never the (2B, T, V) logits; on CPU it scores every position and also computes the entropy,
mean logit and top-1 metrics), its ``_metrics`` bookkeeping; tunelab's full-logits log-softmax
(``tunelab.align.logps``), its step-0 reference check, its per-step metrics record.

Data preparation is outside the timed steps on both sides: TRL tokenizes the text dataset in
``__init__``; tunelab gets the same token ids pre-tokenized — its real ``PairCollator`` (padding,
concatenation, record keys) runs every step, only its encoder is replaced by a lookup of the ids TRL's
tokenization produced (tunelab's own text encoder would otherwise tokenize inside every step; its cost
per batch is recorded separately as ``tunelab_text_collate_ms``).

Timing. Each side runs in a fresh interpreter per round (``--side``); a round is one process per side,
the order alternating between rounds (tunelab first in odd rounds, TRL first in even ones), and the
per-round ratio pairs two processes run back to back (a separate process per side also avoids the
build-order bias of timing two models in one process, see ``_timing.py``). A process runs ``--warmup``
+ ``--steps`` optimizer steps and reports the median of the measured steps under two spans, each on two
clocks (wall clock ``perf_counter`` and process CPU time ``process_time``):

- **step** (the headline, wall clock): from the start of the step's work to the end of its optimizer
  update. TRL: a ``TrainerCallback`` stamps ``on_step_begin`` (the batch is already collated) and
  ``on_step_end`` (after ``optimizer.step``, the scheduler and ``zero_grad``, before logging). tunelab:
  the stamp when the collator returns the step's batch, and the stamp in the loop's per-step callback
  (``log_every: 1``: after the update, the scheduler, ``zero_grad`` and building the step's metrics record);
- **interval**: between consecutive step ends, i.e. everything a step costs in steady state (data
  loading and collation, callbacks, logging bookkeeping included).

The result is the median over rounds of the per-round ratio tunelab / TRL (each round's ratio kept)
and the median step of each side. One torch thread by default (``--threads``): on this 2-core machine,
shared with other jobs, two threads made one process's steps range from 0.9 s to 6 s (every parallel
operator waits for the thread that lost its core); with one thread the process CPU time is the time it
actually computed, a clock that waiting for a core does not inflate, so the CPU-time ratio is reported
beside the wall-clock one. The load average at the start, after each round and at the end is recorded.

After the rounds, one more process per side runs under ``torch.profiler`` (measured steps only) and the
results split each side's operator time into the vocabulary-wide part (operators on a tensor with a
vocabulary-sized dimension: the LM head projection and the log-probs over the vocabulary, forward and
backward) and the rest (``--no-breakdown`` skips it; ``--profile SIDE`` prints it for one side).

Checks printed into the results: the trainable parameter counts, and the first step's loss and mean
chosen / rejected log-probs on both sides (same base weights, adapter B = 0, same first batch: they
must agree to float32 precision — both compute the same DPO quantities on the same tokens).

    python benchmarks/align_dpo_speed.py                      # ~5 minutes on 2 busy cores
    python benchmarks/align_dpo_speed.py --rounds 4 --steps 6 --warmup 2 --batch 8 --threads 1
    python benchmarks/align_dpo_speed.py --profile tunelab    # the profile split of one side, printed

Writes ``benchmarks/results/align_dpo_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("tunelab", "trl")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, BETA, LEARNING_RATE, MAX_GRAD_NORM = 16, 32, 0.1, 5e-4, 1.0
TARGET_RATIO = 1.0
CLOCKS = ("step", "interval", "cpu_step", "cpu_interval")  # wall clock, then process CPU time


# ------------------------------------------------------------------------------------------ shared set-up


def load_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from tunelab.models import tiny

    return PreTrainedTokenizerFast.from_pretrained(str(tiny.WEIGHTS_DIR / "tiny-llama"))


def build_model(tokenizer):
    """tiny-llama's architecture with random weights (seed 0): the same tensors in every process."""
    from tunelab.models import tiny

    return tiny.build_model(tiny.PRESETS["tiny-llama"], tokenizer, seed=0)


def one_token_words(tokenizer) -> list[str]:
    """Alphabetic words that the tokenizer encodes as one token after a space (sorted: deterministic)."""
    vocab = tokenizer.get_vocab()
    words = sorted(token[1:] for token in vocab if token.startswith("Ġ") and token[1:].isalpha() and len(token) > 3)
    return [w for w in words if tokenizer(" " + w, add_special_tokens=False).input_ids == [vocab["Ġ" + w]]]


def make_pairs(tokenizer, n: int, prompt_tokens: int, completion_tokens: int, seed: int = 0) -> list[dict]:
    """``n`` text preference records whose prompt is ``prompt_tokens`` tokens and completions
    ``completion_tokens`` tokens each (the last one EOS, as TRL appends it), plus those token ids."""
    words, rng = one_token_words(tokenizer), random.Random(seed)

    def text(count: int) -> str:
        return " ".join(rng.choice(words) for _ in range(count))

    records = []
    for index in range(n):
        prompt = text(prompt_tokens)
        chosen, rejected = " " + text(completion_tokens - 1), " " + text(completion_tokens - 1)
        record = {"id": f"pair-{index}", "prompt": prompt, "chosen": chosen, "rejected": rejected}
        ids = {key: tokenizer(value, add_special_tokens=False).input_ids for key, value in
               (("prompt", prompt), ("chosen", prompt + chosen + tokenizer.eos_token),
                ("rejected", prompt + rejected + tokenizer.eos_token))}
        if len(ids["prompt"]) != prompt_tokens or ids["chosen"][:prompt_tokens] != ids["prompt"]:
            raise RuntimeError(f"record {index}: the prompt does not tokenize to {prompt_tokens} prefix tokens")
        for side in ("chosen", "rejected"):
            if len(ids[side]) != prompt_tokens + completion_tokens or ids[side][-1] != tokenizer.eos_token_id:
                raise RuntimeError(f"record {index}: {side} does not tokenize to {completion_tokens} tokens + EOS")
        record["token_ids"] = ids
        records.append(record)
    return records


def lora_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class SequentialSampler:
    """tunelab sampler: batches of consecutive records (TRL's ``train_sampling_strategy="sequential"``)."""

    def __init__(self, n: int, batch: int) -> None:
        self.n, self.batch, self.position = n, batch, 0

    def next_indices(self) -> list[int]:
        start = self.position % self.n
        self.position += self.batch
        return list(range(start, start + self.batch))

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class PreTokenized:
    """Stands in for ``PairCollator``'s text encoder: ``(record, completion) -> (input_ids, labels)``
    from the ids TRL's tokenization gives (prompt masked with -100, completion + EOS scored)."""

    def __init__(self, pad: int, prompt_tokens: int) -> None:
        self.pad, self.prompt_tokens = pad, prompt_tokens

    def __call__(self, record: dict, completion: str) -> tuple[list[int], list[int]]:
        side = "chosen" if completion == record["chosen"] else "rejected"
        ids = record["token_ids"][side]
        return ids, [-100] * self.prompt_tokens + ids[self.prompt_tokens :]


class Clock:
    """Per-step stamps (wall clock, process CPU time) of one side; with a ``profiler``, it runs over the
    measured steps only (started at the first measured step's start, stopped at the last step's end)."""

    def __init__(self, warmup: int, total: int, profiler=None) -> None:
        self.warmup, self.total, self.profiler = warmup, total, profiler
        self.begins: list[tuple[float, float]] = []
        self.ends: list[tuple[float, float]] = []

    def begin(self) -> None:
        self.begins.append((time.perf_counter(), time.process_time()))
        if self.profiler is not None and len(self.begins) == self.warmup + 1:
            self.profiler.start()

    def end(self) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))
        if self.profiler is not None and len(self.ends) == self.total:
            self.profiler.stop()


# ------------------------------------------------------------------------------------------------ sides


def run_tunelab(args, tokenizer, records, clock: Clock) -> dict:
    """tunelab's engine: ``tunelab.train.train`` with the ``dpo`` objective, ``reference: base``."""
    from tunelab import tuners
    from tunelab.align import DPOObjective
    from tunelab.train import train

    model = build_model(tokenizer)
    tuners.apply(model, "lora", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    objective = DPOObjective(reference="base", loss_type="sigmoid", beta=BETA)
    collate = objective.collator(tokenizer, None, max_length=args.prompt_tokens + args.completion_tokens,
                                 template="plain")
    started = time.perf_counter()
    collate(records[: args.batch])  # tunelab's own text encoder, for the record only (not used below)
    text_collate_ms = 1000 * (time.perf_counter() - started)
    collate.encode = PreTokenized(collate.encode.pad, args.prompt_tokens)
    first = {}

    def timed_collate(batch_records):
        batch = collate(batch_records)
        clock.begin()
        return batch

    def on_event(record: dict) -> None:
        if "loss" in record:  # a train line: one per step with log_every 1
            clock.end()
            if not first:
                first.update({k: record[k] for k in ("loss", "logps/chosen", "logps/rejected")})

    objective.collate_fn = timed_collate
    total = args.warmup + args.steps
    config = {"max_steps": total, "batch_size": args.batch, "learning_rate": LEARNING_RATE, "schedule": "constant",
              "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": MAX_GRAD_NORM, "log_every": 1,
              "mixed_precision": "no", "seed": 0}
    trainable = lora_trainable(model)
    train(model, records, objective, config, sampler=SequentialSampler(len(records), args.batch), progress=False,
          callbacks=[on_event])
    return {"first_step": first, "trainable": trainable, "tunelab_text_collate_ms": text_collate_ms}


def run_trl(args, tokenizer, records, clock: Clock) -> dict:
    """TRL's ``DPOTrainer`` with ``peft_config`` (no ref_model: the reference is the disabled adapter)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    first = {}

    class Stamps(TrainerCallback):
        trainer = None

        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()
            if not first:
                metrics = self.trainer._metrics["train"]
                first.update({"logps/chosen": metrics["logps/chosen"][-1],
                              "logps/rejected": metrics["logps/rejected"][-1]})
                first["loss"] = float(self.trainer._tr_loss)  # the only step's loss so far

    model = build_model(tokenizer)
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(
            output_dir=output_dir, max_steps=total, per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch",
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, bf16=False, fp16=False,
            gradient_checkpointing=False, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False,
            disable_dropout=True, max_length=None, train_sampling_strategy="sequential", report_to=[],
            save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
            dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
        peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                 task_type="CAUSAL_LM")
        stamps = Stamps()
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[stamps])
        stamps.trainer = trainer
        row = trainer.train_dataset[0]
        shape = (len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"]))
        if shape != (args.prompt_tokens, args.completion_tokens, args.completion_tokens):
            raise RuntimeError(f"TRL tokenized the first pair to (prompt, chosen, rejected) = {shape}")
        if row["prompt_ids"] + row["chosen_ids"] != records[0]["token_ids"]["chosen"]:
            raise RuntimeError("TRL's token ids differ from the ones given to tunelab")
        trainable = lora_trainable(trainer.model)
        torch.manual_seed(0)
        trainer.train()
    return {"first_step": first, "trainable": trainable}


def prepare(args):
    import torch

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    records = make_pairs(tokenizer, args.batch * (args.warmup + args.steps), args.prompt_tokens,
                         args.completion_tokens)
    return tokenizer, records


def run_side(side: str, args) -> dict:
    """One side in this (fresh) process: train warmup + steps, per-step medians in seconds."""
    tokenizer, records = prepare(args)
    total = args.warmup + args.steps
    clock = Clock(args.warmup, total)
    out = (run_tunelab if side == "tunelab" else run_trl)(args, tokenizer, records, clock)
    begins, ends = clock.begins, clock.ends
    if len(begins) != total or len(ends) != total:
        raise RuntimeError(f"{side}: {len(begins)} step starts and {len(ends)} step ends for {total} steps")
    measured = range(args.warmup, total)
    clocks = {}
    for prefix, k in (("", 0), ("cpu_", 1)):  # wall clock (perf_counter), then process CPU time
        steps = [ends[i][k] - begins[i][k] for i in measured]
        intervals = [ends[i][k] - ends[i - 1][k] for i in measured]
        clocks |= {f"{prefix}step_s": statistics.median(steps), f"{prefix}interval_s": statistics.median(intervals),
                   f"{prefix}steps_s": steps, f"{prefix}intervals_s": intervals}
    return {**out, **clocks}


def profile_side(side: str, args) -> dict:
    """torch.profiler over the measured steps of one side: self CPU ms per step, split into the operators on
    vocabulary-wide tensors (a dimension equal to the vocabulary size: the LM head projection and the
    log-prob computation over it, forward and backward) and everything else (blocks, LoRA, attention,
    optimizer); plus the top operators of each part."""
    from torch.profiler import ProfilerActivity, profile

    tokenizer, records = prepare(args)
    vocab = len(tokenizer)
    profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    clock = Clock(args.warmup, args.warmup + args.steps, profiler)
    (run_tunelab if side == "tunelab" else run_trl)(args, tokenizer, records, clock)
    parts: dict[str, dict[str, float]] = {"vocab": {}, "rest": {}}
    for entry in profiler.key_averages(group_by_input_shape=True):
        part = "vocab" if any(vocab in (shape or []) for shape in entry.input_shapes) else "rest"
        key = f"{entry.key} {entry.input_shapes}" if part == "vocab" else entry.key
        parts[part][key] = parts[part].get(key, 0.0) + entry.self_cpu_time_total / 1000 / args.steps  # ms/step
    result = {f"{part}_ms": sum(ops.values()) for part, ops in parts.items()}
    result["total_ms"] = result["vocab_ms"] + result["rest_ms"]
    for part, ops in parts.items():
        result[f"top_{part}"] = [[name, ms] for name, ms in sorted(ops.items(), key=lambda x: -x[1])[: args.profile_rows]]
    return result


# ----------------------------------------------------------------------------------------------- driver


def measure(args) -> dict:
    from _timing import python_command, run_json

    load_start = os.getloadavg()
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
              "--completion-tokens", str(args.completion_tokens)]
    rounds = []
    for index in range(args.rounds):
        order = list(SIDES) if index % 2 == 0 else list(SIDES[::-1])
        runs = {}
        for side in order:
            runs[side] = run_json(python_command(__file__, "--side", side, *common))
        ratios = {f"{clock}_ratio": runs["tunelab"][f"{clock}_s"] / runs["trl"][f"{clock}_s"] for clock in CLOCKS}
        rounds.append({"order": order, **{side: runs[side] for side in SIDES}, **ratios,
                       "loadavg_1min": os.getloadavg()[0]})
        print(f"round {index + 1}/{args.rounds} ({','.join(order)}): step tunelab {1000 * runs['tunelab']['step_s']:.0f} ms, "
              f"TRL {1000 * runs['trl']['step_s']:.0f} ms, ratio {ratios['step_ratio']:.3f}; CPU-time ratio "
              f"{ratios['cpu_step_ratio']:.3f}; interval ratio {ratios['interval_ratio']:.3f}; "
              f"load {rounds[-1]['loadavg_1min']:.2f}", flush=True)
    breakdown = {}
    if not args.no_breakdown:  # one profiled process per side, after the timed rounds
        for side in SIDES:
            breakdown[side] = run_json(python_command(__file__, "--profile", side, "--json", *common))
    return {"rounds": rounds, "breakdown": breakdown, "loadavg_start": load_start, "loadavg_end": os.getloadavg()}


def summarize(measured: dict, args) -> dict:
    import peft
    import torch
    import transformers
    import trl

    rounds = measured["rounds"]
    last = rounds[-1]
    summary = {
        "benchmark": "align_dpo_speed",
        "target": f"tunelab step time / TRL DPOTrainer step time <= {TARGET_RATIO}",
        **{f"{clock}_ratio": statistics.median(r[f"{clock}_ratio"] for r in rounds) for clock in CLOCKS},
        **{f"round_{clock}_ratios": [r[f"{clock}_ratio"] for r in rounds] for clock in CLOCKS},
        **{f"{clock}_ms": {side: 1000 * statistics.median(r[side][f"{clock}_s"] for r in rounds) for side in SIDES}
           for clock in CLOCKS},
        "trainable": {side: last[side]["trainable"] for side in SIDES},
        "first_step": {side: last[side]["first_step"] for side in SIDES},
        "tunelab_text_collate_ms": statistics.median(r["tunelab"]["tunelab_text_collate_ms"] for r in rounds),
        "settings": {"model": "tiny-llama shape (tunelab.models.tiny.PRESETS['tiny-llama']), random weights seed 0",
                     "lora": {"r": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS},
                     "reference": "base model, adapter disabled (tunelab reference: base; TRL PEFT, no ref_model)",
                     "loss": "sigmoid", "beta": BETA, "optimizer": "torch.optim.AdamW (non-fused)",
                     "learning_rate": LEARNING_RATE, "schedule": "constant", "max_grad_norm": MAX_GRAD_NORM,
                     "grad_accum": 1, "precision": "fp32", "batch_pairs": args.batch,
                     "prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens,
                     "rows_per_forward": 2 * args.batch, "tokens_per_row": args.prompt_tokens + args.completion_tokens,
                     "threads": args.threads, "rounds": args.rounds, "warmup_steps": args.warmup,
                     "measured_steps": args.steps},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__, "python": platform.python_version(), "machine": platform.machine(),
                     "cpus": os.cpu_count()},
        "loadavg_start": measured["loadavg_start"], "loadavg_end": measured["loadavg_end"],
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "profile_breakdown_ms_per_step": measured["breakdown"],
        "rounds": rounds,
    }
    summary["meets_target"] = summary["step_ratio"] <= TARGET_RATIO
    return summary


def write(summary: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "align_dpo_speed.json").write_text(json.dumps(summary, indent=2) + "\n")
    s, v, first = summary["settings"], summary["versions"], summary["first_step"]
    load = " / ".join(f"{x:.2f}" for x in summary["loadavg_start"])
    load_end = " / ".join(f"{x:.2f}" for x in summary["loadavg_end"])
    verdict = {True: "met", False: "**missed**"}
    labels = {"step": "step, wall clock (headline)", "cpu_step": "step, process CPU time",
              "interval": "interval (step end to step end), wall clock", "cpu_interval": "interval, process CPU time"}
    lines = [
        f"# DPO step time: tunelab vs TRL DPOTrainer (LoRA, reference = base; target ≤ {TARGET_RATIO}×)", "",
        f"tiny-llama shape (random weights), LoRA r {s['lora']['r']} / alpha {s['lora']['alpha']} on "
        f"{', '.join(s['lora']['target_modules'])}; {s['batch_pairs']} pairs per step = {s['rows_per_forward']} rows × "
        f"{s['tokens_per_row']} tokens (prompt {s['prompt_tokens']} + completion {s['completion_tokens']}, no padding); "
        f"sigmoid loss, beta {s['beta']}, AdamW lr {s['learning_rate']} constant, clip {s['max_grad_norm']}, fp32, "
        f"{s['threads']} torch thread(s). torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
        f"peft {v['peft']}. {s['rounds']} rounds, each one fresh process per side (order alternating), "
        f"{s['warmup_steps']} warm-up + {s['measured_steps']} measured steps per process; medians "
        f"(`python benchmarks/align_dpo_speed.py`, {summary['measured_at']}).", "",
        "| clock | tunelab (ms) | TRL (ms) | tunelab / TRL | per-round ratios | ≤ target |",
        "|---|---:|---:|---:|---|---|",
    ]
    for clock in ("step", "cpu_step", "interval", "cpu_interval"):
        ms, ratio = summary[f"{clock}_ms"], summary[f"{clock}_ratio"]
        cell = f"**{ratio:.3f}**" if clock == "step" else f"{ratio:.3f}"
        lines.append(f"| {labels[clock]} | {ms['tunelab']:.0f} | {ms['trl']:.0f} | {cell} | "
                     + ", ".join(f"{r:.3f}" for r in summary[f"round_{clock}_ratios"])
                     + f" | {verdict[ratio <= TARGET_RATIO] if clock == 'step' else '–'} |")
    lines += [
        "",
        f"Load average (1 / 5 / 15 min) at the start: {load}; at the end: {load_end}, on {v['cpus']} cores "
        "(1-minute load after each round: " + ", ".join(f"{r['loadavg_1min']:.2f}" for r in summary["rounds"])
        + "). The machine was shared with other jobs: absolute wall times are inflated by waiting for a core, "
        "differently in each process; the paired per-round ratios and the CPU-time clock (one thread: the time the "
        "process actually computed) are the numbers to read.", "",
        f"Same computation: trainable parameters tunelab {summary['trainable']['tunelab']:,}, TRL "
        f"{summary['trainable']['trl']:,}; first step (same base weights, same first batch, adapter B = 0): loss "
        f"{first['tunelab']['loss']:.6f} / {first['trl']['loss']:.6f}, mean chosen log-prob "
        f"{first['tunelab']['logps/chosen']:.4f} / {first['trl']['logps/chosen']:.4f}, mean rejected log-prob "
        f"{first['tunelab']['logps/rejected']:.4f} / {first['trl']['logps/rejected']:.4f} (tunelab / TRL).", "",
        "Clocks: *step* = TRL `on_step_begin` → `on_step_end` (batch already collated; policy forward, reference "
        "forward, backward, clip, AdamW, scheduler, zero_grad); tunelab from its collator returning the batch to its "
        "per-step callback (the same work plus building the step's metrics record). *interval* = consecutive step "
        "ends (data loading, collation and logging included). tunelab gets TRL's token ids pre-tokenized (its "
        "PairCollator pads and concatenates every step); its own text encoding would add about "
        f"{summary['tunelab_text_collate_ms']:.1f} ms per batch (measured once per process, outside the steps).",
    ]
    breakdown = summary.get("profile_breakdown_ms_per_step") or {}
    if breakdown:
        lines += ["", "## Where the time goes (torch.profiler, one process per side, measured steps only)", "",
                  "Self time per step of the operators on vocabulary-wide tensors (the LM head projection and the "
                  "log-probs over the vocabulary, forward and backward) and of all others (blocks, LoRA, attention, "
                  "optimizer). The profiler times operators by wall clock and adds overhead, so on a shared machine "
                  "read the shares rather than the milliseconds.", "",
                  "| side | total (ms) | vocabulary-wide (ms) | share | rest (ms) | largest vocabulary-wide operators (ms) |",
                  "|---|---:|---:|---:|---:|---|"]
        for side in SIDES:
            b = breakdown[side]
            top = "; ".join(f"{name} {ms:.0f}" for name, ms in b["top_vocab"][:5])
            lines.append(f"| {side} | {b['total_ms']:.0f} | {b['vocab_ms']:.0f} | {b['vocab_ms'] / b['total_ms']:.0%} | "
                         f"{b['rest_ms']:.0f} | {top} |")
        lines += ["", "The two vocabulary-wide code paths: TRL's fused LM head on CPU (no Triton) projects every "
                  "position (2B × (T − 1) rows, prompt included) in vocabulary chunks, also computes the entropy, "
                  "mean-logit and top-1 metrics, and recomputes the projection in its backward; tunelab builds the "
                  "full (2B, T, V) logits once and runs `log_softmax` over all positions twice per forward (summed "
                  "and mean-token log-probs are two `sequence_logps` calls, and both are backpropagated in the "
                  "policy pass). On CUDA TRL's Triton kernel projects only the completion positions, so these "
                  "CPU numbers do not carry over to a GPU."]
    (RESULTS / "align_dpo_speed.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per process (at least 1)")
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (see the docstring)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=SIDES, help="print a torch.profiler table of one side and exit")
    parser.add_argument("--profile-rows", type=int, default=8, help="operators listed per part in a profile")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the profiled run of each side that the results' breakdown comes from")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the interval clock needs the step before)")
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return
    if args.profile:
        result = profile_side(args.profile, args)
        if args.json:
            print(json.dumps(result))
            return
        print(f"{args.profile}: {result['total_ms']:.0f} ms self CPU per step, vocabulary-wide operators "
              f"{result['vocab_ms']:.0f} ms, the rest {result['rest_ms']:.0f} ms")
        for part in ("vocab", "rest"):
            for name, ms in result[f"top_{part}"]:
                print(f"  {part:5s} {ms:8.1f} ms  {name}")
        return
    summary = summarize(measure(args), args)
    write(summary)
    print((RESULTS / "align_dpo_speed.md").read_text())


if __name__ == "__main__":
    main()
