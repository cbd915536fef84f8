"""Quality against trainable parameters: full FT vs LoRA vs (IA)³ vs Houlsby vs Pfeiffer vs Compacter.

MiniLM (the real all-MiniLM-L6-v2, offline) on the built-in world's two understanding tasks,
``domain_classification`` (4 classes) and ``urgency`` (3 classes), all domains; a few hundred training
examples, three training budgets (30, 60 and 150 steps: how fast each method learns, and where it
ends), 3 seeds per (method, task, budget). Every adapter method trains the new
classification head in full (``modules_to_save=["classifier"]``), so the methods differ only in how
they adapt the encoder. Learning rates are the usual ones per family (adapters ~1e-3, full FT 5e-5).

Writes ``results/adapter_comparison.{json,md}`` and ``results/adapter_comparison.png`` (accuracy vs
trainable parameters, log scale), plus the parameter budget of each method on MiniLM and on a
BERT-base-shaped model (built on the meta device: no weights, exact counts).

    python benchmarks/adapter_comparison.py [--steps 30 60 150] [--seeds 0 1 2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from tunelab import tuners
from tunelab.data import synthetic
from tunelab.data.collate import ClassificationCollator
from tunelab.models import zoo
from tunelab.train import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("domain_classification", "urgency")
HEAD = ["classifier"]
METHODS = {  # label -> (method, options, learning rate)
    "full": ("full", {}, 1e-4),
    "lora": ("lora", dict(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=HEAD), 2e-3),
    "ia3": ("ia3", dict(modules_to_save=HEAD), 1e-2),
    "houlsby": ("bottleneck", dict(placement="houlsby", reduction_factor=16, modules_to_save=HEAD), 2e-3),
    "pfeiffer": ("bottleneck", dict(placement="pfeiffer", reduction_factor=16, modules_to_save=HEAD), 2e-3),
    "compacter": ("compacter", dict(reduction_factor=32, phm_dim=4, modules_to_save=HEAD), 5e-3),
    "compacter++": ("compacter", dict(variant="compacter++", reduction_factor=32, phm_dim=4, modules_to_save=HEAD),
                    5e-3),
}
DEFAULT_METHODS = ["full", "lora", "ia3", "houlsby", "pfeiffer", "compacter"]  # compacter++: budget table only
MAX_LENGTH = 48  # the world's sentences are short; 48 tokens cover them


def records(task: str, split: str, n: int) -> list[dict]:
    return synthetic.make_task(task, domain="all", split=split, n=n, seed=0)


@torch.no_grad()
def accuracy(model: torch.nn.Module, collate: ClassificationCollator, test: list[dict], batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(test), batch_size):
        batch = collate(test[start:start + batch_size])
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(test)


def run_cell(label: str, task: str, seed: int, steps: int, n_train: int, n_test: int, threads: int = 1) -> dict:
    torch.set_num_threads(threads)  # a worker process: one thread each (contending threads are far slower)
    method, options, learning_rate = METHODS[label]
    names = synthetic.label_names(task)
    torch.manual_seed(seed)  # the new head's initialisation
    model, tokenizer = zoo.load("minilm", task="sequence_classification", label_names=names, progress=False)
    total = sum(p.numel() for p in model.parameters())
    tuners.apply(model, method, **options)
    trainable = sum(p.numel() for _, p in tuners.trainable_parameters(model))
    collate = ClassificationCollator(tokenizer, names, max_length=MAX_LENGTH)
    config = TrainConfig(learning_rate=learning_rate, max_steps=steps, batch_size=16, schedule="linear",
                         warmup_ratio=0.06, eval_every=10_000, save_every=10_000, log_every=10_000, seed=seed)
    result = train(model, records(task, "train", n_train), collate, config, progress=False)
    score = accuracy(model, collate, records(task, "test", n_test))
    return {"method": label, "task": task, "seed": seed, "accuracy": score, "trainable": trainable,
            "trainable_percent": 100 * trainable / total, "train_seconds": result.train_seconds,
            "final_loss": result.history[-1]["loss"] if result.history else None}


def parameter_budget() -> list[dict]:
    """Trainable parameters of every method on MiniLM and on a BERT-base-shaped classifier."""
    shapes = {"MiniLM-L6 (d=384, L=6)": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                   intermediate_size=1536, num_labels=4),
              "BERT-base (d=768, L=12)": BertConfig(num_labels=4)}
    rows = []
    for label, (method, options, _) in METHODS.items():
        row = {"method": label}
        for shape, config in shapes.items():
            with torch.device("meta"):
                model = BertForSequenceClassification(config)
            total = sum(p.numel() for p in model.parameters())
            tuners.apply(model, method, **options)
            trainable = sum(p.numel() for _, p in tuners.trainable_parameters(model))
            head = sum(p.numel() for n, p in tuners.trainable_parameters(model) if "classifier" in n)
            encoder = trainable - head if method != "full" else trainable
            row[shape] = {"trainable": trainable, "percent": 100 * trainable / total,
                          "encoder_only_percent": 100 * encoder / total}
        rows.append(row)
    return rows


def summarize(cells: list[dict], budgets: list[int]) -> list[dict]:
    """One row per method: trainable counts and ``row[(task, steps)] = (mean, std)`` over seeds."""
    rows = []
    for label in METHODS:
        mine = [c for c in cells if c["method"] == label]
        if not mine:
            continue
        row = {"method": label, "trainable": mine[0]["trainable"], "percent": mine[0]["trainable_percent"]}
        for steps in budgets:
            for task in TASKS:
                scores = [c["accuracy"] for c in mine if c["task"] == task and c["config"]["steps"] == steps]
                if scores:
                    row[(task, steps)] = (statistics.mean(scores), statistics.pstdev(scores))
            seconds = [c["train_seconds"] for c in mine if c["config"]["steps"] == steps]
            if seconds:
                row[("seconds", steps)] = statistics.median(seconds)
        rows.append(row)
    return rows


def markdown(rows: list[dict], budget: list[dict], args: argparse.Namespace, wall: float) -> str:
    columns = [(task, steps) for task in TASKS for steps in args.steps]
    lines = ["# Adapter comparison on MiniLM (all-MiniLM-L6-v2)", "",
             f"Built-in world, domain='all'; {args.train} training / {args.test} test examples per domain (x4 domains) "
             f"per task, batch 16, max length {MAX_LENGTH}, seeds {args.seeds}; test accuracy mean ± std over seeds "
             f"after {' / '.join(map(str, args.steps))} training steps (each budget is its own run with its own "
             "linear schedule). Trainable counts include the 4-class head (1.5k) for every method. "
             f"Summed training time of all cells {wall / 60:.1f} min on a 2-core CPU ({args.jobs} worker processes, "
             f"{args.threads} thread each).", "",
             "| method | trainable | % of model | " + " | ".join(f"{t} @{n}" for t, n in columns)
             + " | median train s @" + str(args.steps[-1]) + " |",
             "|---|---:|---:|" + "---:|" * len(columns) + "---:|"]
    for row in rows:
        scores = " | ".join(f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if c in row else "—" for c in columns)
        seconds = row.get(("seconds", args.steps[-1]))
        lines.append(f"| {row['method']} | {row['trainable']:,} | {row['percent']:.3f} | {scores} | "
                     f"{'—' if seconds is None else f'{seconds:.0f}'} |")
    shapes = [key for key in budget[0] if key != "method"]
    lines += ["", "## Parameter budget (exact counts, 4-class head included; encoder-only % in brackets)", "",
              "| method | " + " | ".join(shapes) + " |", "|---|" + "---:|" * len(shapes)]
    for row in budget:
        cells = " | ".join(f"{row[s]['trainable']:,} ({row[s]['percent']:.3f}% [{row[s]['encoder_only_percent']:.3f}%])"
                           for s in shapes)
        lines.append(f"| {row['method']} | {cells} |")
    lines += ["", "![accuracy vs trainable parameters](adapter_comparison.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], budgets: list[int], path: Path) -> None:
    """Accuracy vs trainable parameters (log), one panel per task, one colour per step budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 4), sharey=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, task in zip(axes, TASKS, strict=True):
        for index, steps in enumerate(budgets):
            points = [(row["trainable"], *row[(task, steps)], row["method"]) for row in rows if (task, steps) in row]
            if not points:
                continue
            xs, means, stds, labels = zip(*points, strict=True)
            axis.errorbar(xs, means, yerr=stds, fmt="o", capsize=3, color=colours[index % len(colours)],
                          label=f"{steps} steps")
            if index == 0:
                for x, mean, label in zip(xs, means, labels, strict=True):
                    axis.annotate(label, (x, mean), textcoords="offset points", xytext=(4, -10), fontsize=8)
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters (log)")
        axis.set_ylabel("test accuracy")
        axis.set_title(f"MiniLM · {task}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


CELLS = RESULTS / "adapter_comparison_cells.jsonl"  # one line per finished (method, task, seed)


def cell_config(args: argparse.Namespace, steps: int) -> dict:
    return {"steps": steps, "train": args.train, "test": args.test}


def read_cells(args: argparse.Namespace) -> list[dict]:
    """Finished cells of these configurations (a rerun continues where the last one stopped)."""
    if not CELLS.is_file():
        return []
    cells = [json.loads(line) for line in CELLS.read_text().splitlines() if line.strip()]
    wanted = [cell_config(args, steps) for steps in args.steps]
    return [c for c in cells if c.get("config") in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 60, 150], help="training budgets to compare")
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--test", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the finished cells")
    args = parser.parse_args()
    args.steps = sorted(set(args.steps))
    RESULTS.mkdir(exist_ok=True)
    done = {(c["config"]["steps"], c["method"], c["task"], c["seed"]): c for c in read_cells(args)}  # skipped
    jobs = [(label, task, seed, steps, args.train, args.test, args.threads)
            for steps in args.steps for seed in args.seeds for task in TASKS for label in args.methods
            if (steps, label, task, seed) not in done]
    if jobs and not args.report_only:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for job, cell in zip(jobs, pool.map(run_cell, *zip(*jobs, strict=True)), strict=True):
                cell = {**cell, "config": cell_config(args, job[3])}
                done[(job[3], cell["method"], cell["task"], cell["seed"])] = cell
                with CELLS.open("a") as handle:
                    handle.write(json.dumps(cell) + "\n")
                print(json.dumps(cell), flush=True)
    cells = [c for c in done.values() if c["method"] in args.methods and c["seed"] in args.seeds]
    wall = sum(c["train_seconds"] for c in cells)  # cells may come from several invocations
    rows, budget = summarize(cells, args.steps), parameter_budget()
    summary = [{key if isinstance(key, str) else f"{key[0]}@{key[1]}": value for key, value in row.items()}
               for row in rows]
    payload = {"args": vars(args), "wall_seconds": wall, "cells": cells, "summary": summary, "parameter_budget": budget}
    (RESULTS / "adapter_comparison.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / "adapter_comparison.md").write_text(markdown(rows, budget, args, wall))
    plot(rows, args.steps, RESULTS / "adapter_comparison.png")
    print(markdown(rows, budget, args, wall))


if __name__ == "__main__":
    main()
