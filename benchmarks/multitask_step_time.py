"""Multi-task step time: a mixed-task batch vs single-task batches of the same size (target ≤ 1.15×).

The multi-task issue asks that mixing tasks in one batch (``switching: example``) costs at most 15%
more per training step than a batch of one task. On the shipped ``tiny-llama`` with LoRA r 16 on all
linear layers and four built-in medical tasks (summarization on the LM head, NER, extractive QA and
urgency on their own heads; ``max_length`` 160), one optimizer step is timed on

- a **mixed** batch of 16 rows, 4 per task, and
- a **single-task** batch of 16 rows for each task,

with both sharing modes that route differently: ``hard`` (one adapter, only the heads differ per row)
and ``per_task`` (one adapter per task, chosen per row inside the batch), the latter also with
``lora_dropout`` 0.1 (``per_task+dropout``: dropout rules out stacking the adapters' factors), and each
with both ways of running a mixed batch: ``+blocks`` (``mixed_forward: blocks``: one forward per task
block, each cut to its own longest row) and ``+routed`` (one forward of the whole batch, adapters routed
per row inside every layer). The default, ``auto``, runs one of the two per batch (blocks when they
drop at least 15% of the padded positions); the last column says which, for each row's mixed batch.
Two comparisons:

- **same shape** (the target): every batch padded to the mixed batch's length (16 × T) with every
  position attended (attention mask all ones, so no side has padding to drop), so the ratio
  mixed / mean of the four single-task steps is the cost of mixing itself (per-row heads, losses,
  adapter routing or the extra forwards of the blocks);
- **natural padding**: each batch padded to its own longest row. A routed mixed batch pads every row to
  the longest task's length, so it costs about what a batch of that task costs (compare it with the
  slowest single-task step); blocks pad each task's rows to their own longest, so mixed / mean single is
  the comparable number for them.

Every side shares one model and optimizer, steps alternate between sides (the order reverses every
step), each round runs in a fresh interpreter, and the result is the median over rounds of each
round's ratio of median step times (see ``_timing.py``). Writes ``results/multitask_step_time.{json,md}``.

    python benchmarks/multitask_step_time.py [--rounds 3] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import python_command, run_json, time_round  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("summarization", "ner", "extractive_qa", "urgency")
GROUPS = {"summarization": "generation", "ner": "understanding", "extractive_qa": "understanding", "urgency": "understanding"}
BATCH, MAX_LENGTH, TARGET = 16, 160, 1.15
# sharing[+dropout]+blocks|+routed: +dropout = lora_dropout 0.1; +blocks = mixed_forward: blocks (one forward per
# task block, each cut to its own longest row), +routed = mixed_forward: routed (one forward, adapters routed per
# row). The default, auto, is one of the two per batch; each row records which one it would run.
SHARING = ("hard+blocks", "hard+routed", "per_task+blocks", "per_task+routed",
           "per_task+dropout+blocks", "per_task+dropout+routed")
SHAPES = ("same", "natural")


def pad_to(batch: dict, length: int, pad_id: int) -> dict:
    """``batch`` with its token axis padded to ``length`` on the collator's side (ids: pad, mask: 0, per-token
    labels: -100); span and class labels are positions / ids and stay as they are."""
    import torch.nn.functional as F

    mask = batch["attention_mask"]
    extra = length - mask.shape[1]
    if extra <= 0:
        return batch
    left = bool((mask[:, 0] == 0).any())
    pad = (extra, 0) if left else (0, extra)

    def grow(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(tensor, pad, value=value) if tensor.dim() == 2 and tensor.shape[1] == mask.shape[1] else tensor

    labels = batch["labels"]
    labels = {k: grow(v, -100) for k, v in labels.items()} if isinstance(labels, dict) else grow(labels, -100)
    return {**batch, "input_ids": grow(batch["input_ids"], pad_id), "attention_mask": grow(mask, 0), "labels": labels}


def builders(sharing: str, same_shape: bool) -> dict:
    """``side -> builder``: one model, objective and optimizer shared by every side; each side its batch."""
    sharing, *variants = sharing.split("+")
    dropout = 0.1 if "dropout" in variants else 0.0
    mixed_forward = "routed" if "routed" in variants else "blocks" if "blocks" in variants else "auto"
    from tunelab.data import synthetic
    from tunelab.experiments import registry
    from tunelab.experiments.preflight import apply_method
    from tunelab.experiments.spec import MethodSpec
    from tunelab.models import zoo
    from tunelab.multitask.collate import block_widths, task_blocks
    from tunelab.multitask.objective import blocks_pay

    torch.manual_seed(0)
    model, tokenizer = zoo.load("tiny-llama", progress=False)
    model = apply_method(model, MethodSpec(name="lora", options={"r": 16, "lora_alpha": 32, "lora_dropout": dropout,
                                                                 "target_modules": "all-linear"}), "causal_lm")
    objective = registry.build_objective("multitask", {
        "tasks": [{"name": name, "group": GROUPS[name]} for name in TASKS], "sharing": sharing,
        "switching": "example", "weighting": "equal",
        "mixed_forward": mixed_forward})
    objective.collator(tokenizer, None, max_length=MAX_LENGTH, template="plain")
    objective.setup(model, SimpleNamespace(device=torch.device("cpu")))
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    parameters += [p for module in objective.modules() for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    rows = {name: synthetic.make_task(name, domain="medical", split="train", n=BATCH, seed=0) for name in TASKS}
    per_task = BATCH // len(TASKS)
    batches = {"mixed": [row for name in TASKS for row in rows[name][:per_task]]}
    batches |= {f"single:{name}": rows[name][:BATCH] for name in TASKS}
    collated = {side: objective.collate_fn(records) for side, records in batches.items()}
    if same_shape:
        length = collated["mixed"]["input_ids"].shape[1]
        collated = {side: pad_to(batch, length, tokenizer.pad_token_id) for side, batch in collated.items()}
        # every position attended: no side has padding to drop, so blocks run the same 16 x T tokens as routing
        collated = {side: {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}
                    for side, batch in collated.items()}

    def stepper(side: str):
        def step() -> None:
            objective.loss(model, collated[side]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    mixed = collated["mixed"]
    blocks = task_blocks(mixed["tasks"])
    auto = "blocks" if blocks_pay(mixed, blocks, block_widths(mixed, blocks)) else "routed"
    return {side: (lambda side=side: stepper(side)) for side in batches}, auto


def one_round(sharing: str, same_shape: bool, order: list[str], steps: int) -> dict[str, float | str]:
    sides, auto = builders(sharing, same_shape)
    return {**time_round(sides, order, steps), "auto": auto}


def measure(rounds: int, steps: int, threads: int) -> dict:
    results = {}
    for sharing, shape in [(sharing, shape) for shape in SHAPES for sharing in SHARING]:
        ratios, slowest, medians = [], [], []
        for index in range(rounds):
            order = ["mixed", *[f"single:{name}" for name in TASKS]]
            order = order if index % 2 == 0 else order[::-1]
            command = python_command(__file__, "--round", sharing, "--shape", shape, "--order", ",".join(order),
                                     "--steps", str(steps), "--threads", str(threads))
            times = run_json(command)
            auto = times.pop("auto")  # what mixed_forward: auto runs on this mixed batch
            singles = [times[f"single:{name}"] for name in TASKS]
            ratios.append(times["mixed"] / statistics.mean(singles))
            slowest.append(times["mixed"] / max(singles))
            medians.append(times)
        step_ms = {side: 1000 * statistics.median(m[side] for m in medians) for side in medians[0]}
        results[f"{sharing}/{shape}"] = {"sharing": sharing, "shape": shape, "ratio_vs_mean_single": statistics.median(ratios), "round_ratios": ratios,
                            "ratio_vs_slowest_single": statistics.median(slowest), "step_ms": step_ms, "auto_runs": auto,
                            "meets_target": statistics.median(ratios) <= TARGET if shape == "same" else None}
    return results


def write(results: dict, rounds: int, steps: int, threads: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    record = {"benchmark": "multitask_step_time", "model": "tiny-llama", "method": "lora r16 all-linear",
              "tasks": list(TASKS), "batch": BATCH, "max_length": MAX_LENGTH, "rounds": rounds, "steps": steps,
              "threads": threads, "torch": torch.__version__, "target": TARGET, "results": results,
              "measured_at": time.strftime("%Y-%m-%d")}
    (RESULTS / "multitask_step_time.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Multi-task step time: mixed-task vs single-task batches (target ≤ {TARGET}×)", "",
             f"tiny-llama + LoRA r 16 (all linear layers), batch {BATCH}, max_length {MAX_LENGTH}, "
             f"{threads} thread(s), torch {torch.__version__}; median over {rounds} rounds of {steps} "
             f"alternating steps per side (`python benchmarks/multitask_step_time.py`).", "",
             "| sharing | padding | mixed step (ms) | " + " | ".join(f"{t} step (ms)" for t in TASKS)
             + " | mixed / mean single | mixed / slowest single | rounds | ≤ target | auto runs |",
             "|---|---|---:|" + "---:|" * len(TASKS) + "---:|---:|---|---|---|"]
    for result in results.values():
        ms, meets = result["step_ms"], {True: "yes", False: "no", None: "–"}[result["meets_target"]]
        lines.append(f"| {result['sharing']} | {result['shape']} | {ms['mixed']:.0f} | " + " | ".join(f"{ms[f'single:{t}']:.0f}" for t in TASKS)
                     + f" | **{result['ratio_vs_mean_single']:.3f}** | {result['ratio_vs_slowest_single']:.3f} | "
                     + ", ".join(f"{r:.3f}" for r in result["round_ratios"])
                     + f" | {meets} | {result['auto_runs']} |")
    (RESULTS / "multitask_step_time.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--round", choices=SHARING, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=SHAPES, help=argparse.SUPPRESS)
    parser.add_argument("--order", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.round:
        print(json.dumps(one_round(args.round, args.shape == "same", args.order.split(","), args.steps)))
        return
    results = measure(args.rounds, args.steps, args.threads)
    write(results, args.rounds, args.steps, args.threads)
    print((RESULTS / "multitask_step_time.md").read_text())


if __name__ == "__main__":
    main()
