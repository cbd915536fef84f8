"""AdapterDrop on MiniLM: 8 task adapters in parallel on one batch, inference time and quality for k = 0..L.

Rücklé et al. 2021 (arXiv:2010.11918) report that with 8 task adapters run in parallel, dropping the
adapters of the 5 lowest layers (of 12) makes inference 39% faster. Here, on all-MiniLM-L6-v2 (L = 6):

1. train 8 Pfeiffer adapters (one per task, each with its own head copy) with *robust* AdapterDrop
   (``adapterdrop_train_layers=5``: every step skips the adapters of n ~ U{0..5} lowest blocks), in
   worker processes, saved with ``tuners.save``;
2. load all 8 onto one model; for k = 0..L, time one forward pass of the 8 tasks on one batch with
   ``tuners.parallel_adapters`` (the first k blocks run once, then the batch is copied 8 times), rounds
   alternating over k, median per k; the ratio is time(k) / time(0);
3. quality: each task's test accuracy with its adapter and ``set_adapter_drop(model, k)``.

The 8 tasks come from the built-in world (domain='all'): ``domain`` (4 classes), ``urgency`` (3), and
six binary ones derived from the same records (``is_<domain>`` x4, ``urgency_high``, ``urgency_low``).
Writes ``results/adapterdrop_table.{json,md}``.

    python benchmarks/adapterdrop_table.py [--steps 30] [--rounds 3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from tunelab import tuners
from tunelab.data import synthetic
from tunelab.data.collate import ClassificationCollator
from tunelab.models import zoo
from tunelab.train import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"
NUM_LABELS = 4  # one head shape for every task: binary tasks use logits 0 and 1 only
MAX_LENGTH = 48
ADAPTER = dict(placement="pfeiffer", reduction_factor=16, adapterdrop_train_layers=5, modules_to_save=["classifier"])


def _relabel(records: list[dict], label) -> list[dict]:
    return [{**record, "label": label(record)} for record in records]


def task_records(task: str, split: str, n: int) -> tuple[list[dict], list[str]]:
    """Records and label names of one of the 8 tasks."""
    source = "urgency" if task.startswith("urgency") else "domain_classification"
    records = synthetic.make_task(source, domain="all", split=split, n=n, seed=0)
    if task in ("domain", "urgency"):
        return records, synthetic.label_names(source)
    target = task.split("_", 1)[1]  # is_medical -> medical, urgency_high -> high
    return _relabel(records, lambda r: "yes" if r["label"] == target else "no"), ["no", "yes"]


TASKS = ["domain", "urgency", "is_general", "is_medical", "is_legal", "is_technical", "urgency_high", "urgency_low"]


def train_adapter(task: str, directory: str, steps: int, n_train: int, seed: int = 0) -> dict:
    """Worker: train one task adapter (+ head copy) on MiniLM, save it under ``directory/task``."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model, tokenizer = zoo.load("minilm", task="sequence_classification", num_labels=NUM_LABELS, progress=False)
    tuners.apply(model, "bottleneck", adapter_name=task, **ADAPTER)
    records, names = task_records(task, "train", n_train)
    collate = ClassificationCollator(tokenizer, names, max_length=MAX_LENGTH)
    config = TrainConfig(learning_rate=2e-3, max_steps=steps, batch_size=16, schedule="linear", warmup_ratio=0.06,
                         eval_every=10_000, save_every=10_000, log_every=10_000, seed=seed)
    result = train(model, records, collate, config, progress=False)
    tuners.save(model, Path(directory) / task)
    return {"task": task, "train_seconds": result.train_seconds, "final_loss": result.history[-1]["loss"]}


@torch.no_grad()
def accuracy(model, tokenizer, task: str, n_test: int) -> float:
    records, names = task_records(task, "test", n_test)
    collate = ClassificationCollator(tokenizer, names, max_length=MAX_LENGTH)
    correct = 0
    for start in range(0, len(records), 64):
        batch = collate(records[start:start + 64])
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :len(names)]  # (B, classes of this task)
        correct += (logits.argmax(-1) == labels).sum().item()
    return correct / len(records)


@torch.no_grad()
def parallel_forward(model, batch: dict, heads: list[torch.nn.Module]) -> list[torch.Tensor]:
    """All tasks on one batch: the encoder in parallel mode, then each task's head on its slice."""
    with tuners.parallel_adapters(model, TASKS):
        pooled = model.bert(**batch).pooler_output  # (n * B, d), task-major
    return [head(chunk) for head, chunk in zip(heads, pooled.chunk(len(TASKS)), strict=True)]


def time_inference(model, tokenizer, rounds: int, batch_size: int) -> dict[int, list[float]]:
    records, _ = task_records("domain", "test", batch_size)
    batch = ClassificationCollator(tokenizer, ["general", "medical", "legal", "technical"], MAX_LENGTH)(records)
    batch.pop("labels")
    heads = [model.classifier.modules_to_save[task] for task in TASKS]
    layers = model.config.num_hidden_layers
    times: dict[int, list[float]] = {k: [] for k in range(layers + 1)}
    for round_index in range(rounds + 1):  # round 0 warms up
        order = list(range(layers + 1)) if round_index % 2 else list(reversed(range(layers + 1)))
        for k in order:
            tuners.set_adapter_drop(model, k)
            start = time.perf_counter()
            parallel_forward(model, batch, heads)
            if round_index:
                times[k].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            trained = list(pool.map(train_adapter, TASKS, [directory] * len(TASKS), [args.steps] * len(TASKS),
                                    [args.train] * len(TASKS)))
        torch.set_num_threads(1)
        model, tokenizer = zoo.load("minilm", task="sequence_classification", num_labels=NUM_LABELS, progress=False)
        for task in TASKS:
            tuners.load(model, Path(directory) / task)
    model.eval()
    layers = model.config.num_hidden_layers
    times = time_inference(model, tokenizer, args.rounds, args.batch)
    quality = {}
    for k in range(layers + 1):
        tuners.set_adapter_drop(model, k)
        for task in TASKS:
            tuners.set_active(model, [task])
            quality.setdefault(k, {})[task] = accuracy(model, tokenizer, task, args.test)
    rows = []
    base = statistics.median(times[0])
    for k in range(layers + 1):
        median = statistics.median(times[k])
        rows.append({"k": k, "median_seconds": median, "relative_time": median / base,
                     "speedup_percent": 100 * (base / median - 1),
                     "block_passes_ratio": (k + len(TASKS) * (layers - k)) / (len(TASKS) * layers),
                     "mean_accuracy": statistics.mean(quality[k].values()), "accuracy": quality[k]})
    payload = {"args": vars(args), "tasks": TASKS, "adapter": ADAPTER, "trained": trained, "rows": rows,
               "times": {str(k): v for k, v in times.items()}, "wall_seconds": time.perf_counter() - start}
    (RESULTS / "adapterdrop_table.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / "adapterdrop_table.md").write_text(markdown(rows, args, payload["wall_seconds"], layers))
    print(markdown(rows, args, payload["wall_seconds"], layers))


def markdown(rows: list[dict], args: argparse.Namespace, wall: float, layers: int) -> str:
    lines = ["# AdapterDrop: 8 parallel task adapters on MiniLM", "",
             f"all-MiniLM-L6-v2 (L = {layers}), 8 Pfeiffer adapters (reduction 16) trained {args.steps} steps each "
             "with robust AdapterDrop (n ~ U{0..5} lowest blocks skipped per step). Inference: one batch of "
             f"{args.batch} sequences, all 8 tasks in one `tuners.parallel_adapters` pass (encoder + 8 heads), "
             f"{args.rounds} rounds alternating over k, median; 1 CPU thread on a shared 2-core machine. "
             f"Accuracy: each task's test split, {args.test} examples per domain (x4). Wall time {wall / 60:.1f} min.", "",
             "| k dropped | median s | time vs k=0 | speed-up | block passes vs k=0 | mean acc | "
             + " | ".join(TASKS) + " |",
             "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(TASKS)]
    for row in rows:
        accs = " | ".join(f"{row['accuracy'][t]:.3f}" for t in TASKS)
        lines.append(f"| {row['k']} | {row['median_seconds']:.3f} | {row['relative_time']:.2f} | "
                     f"{row['speedup_percent']:+.0f}% | {row['block_passes_ratio']:.2f} | {row['mean_accuracy']:.3f} | {accs} |")
    lines += ["", "Paper (Rücklé et al. 2021, BERT-base, 12 layers): 8 parallel tasks, 5 lowest layers dropped: "
              "39% faster. `block passes` is the ideal ratio (k + 8 (L - k)) / (8 L).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
