"""P-Tuning v2 vs prompt tuning vs full fine-tuning on MiniLM, for classification and NER.

The claim under test (Liu et al., 2022): shallow prompt tuning (virtual tokens at the input layer
only, Lester et al.) lags fine-tuning on small models and fails on sequence tagging; deep prompts at
every layer (P-Tuning v2) close most of the gap. All three methods train the same linear head
(``classifier``, no verbalizer) on the real pretrained all-MiniLM-L6-v2 (22M parameters, 6 layers),
through ``tuners.apply`` and ``tunelab.train``:

- ``full``: every parameter (learning rate 1e-4);
- ``prompt_tuning``: ``num_virtual_tokens`` input prompts + head (learning rate 3e-2, Lester-style);
- ``p_tuning_v2``: ``num_virtual_tokens`` key/value prompts at every layer + head (learning rate 1e-2).

Tasks come from the built-in world (``make_task(task, domain="all")``): ``domain_classification``
(4 classes), ``urgency`` (3 classes), ``ner`` (BIO tags, entity F1 by seqeval). Test splits hold out
entities. The defaults keep a run at a few minutes per (task, method, seed) on 2 busy cores.

    python benchmarks/p_tuning_v2_comparison.py [--tasks ner urgency --seeds 0 1 2 --steps 100]

Writes ``benchmarks/results/p_tuning_v2_comparison.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {  # name -> (tunelab method, options, learning rate)
    "full": ("full", {}, 1e-4),
    "prompt_tuning": ("prompt_tuning", {"modules_to_save": ["classifier"]}, 3e-2),
    "p_tuning_v2": ("p_tuning_v2", {}, 1e-2),
}


def load(task: str, seed: int):
    from tunelab.data import synthetic
    from tunelab.models import zoo

    kind = "token_classification" if task == "ner" else "sequence_classification"
    return zoo.load("minilm", task=kind, label_names=synthetic.label_names(task), seed=seed, progress=False)


def collator(task: str, tokenizer, max_length: int):
    from tunelab.data import collate, synthetic

    names = synthetic.label_names(task)
    if task == "ner":
        return collate.TokenClassificationCollator(tokenizer, names, max_length=max_length)
    return collate.ClassificationCollator(tokenizer, names, max_length=max_length)


@torch.no_grad()
def evaluate(model, task: str, records: list[dict], collate_fn, batch_size: int = 64) -> dict:
    """Accuracy (classification) or entity F1 + tag accuracy over first sub-tokens (NER)."""
    from tunelab.data import synthetic
    from tunelab.eval import metrics

    model.eval()
    names = synthetic.label_names(task)
    predictions, references = [], []
    for start in range(0, len(records), batch_size):
        batch = collate_fn(records[start : start + batch_size])
        labels = batch.pop("labels")
        logits = model(**batch).logits  # (B, C) or (B, T, C)
        guesses = logits.argmax(-1)
        if task != "ner":
            predictions += guesses.tolist()
            references += labels.tolist()
            continue
        for row_guess, row_label in zip(guesses, labels, strict=True):
            keep = row_label != -100  # first sub-token of each word
            predictions.append([names[i] for i in row_guess[keep].tolist()])
            references.append([names[i] for i in row_label[keep].tolist()])
    if task != "ner":
        return {"accuracy": metrics.accuracy(predictions, references)}
    flat = [(p, r) for ps, rs in zip(predictions, references, strict=True) for p, r in zip(ps, rs, strict=True)]
    return {"entity_f1": metrics.entity_f1(predictions, references),
            "tag_accuracy": sum(p == r for p, r in flat) / len(flat)}


def run(task: str, method: str, seed: int, args) -> dict:
    from tunelab import tuners
    from tunelab.data import synthetic
    from tunelab.train import TrainConfig, train
    from tunelab.utils import seed_everything

    seed_everything(seed)
    model, tokenizer = load(task, seed)
    name, options, learning_rate = METHODS[method]
    options = dict(options)
    if name != "full":
        options["num_virtual_tokens"] = args.num_virtual_tokens
    tuners.apply(model, name, **options)
    trainable = sum(p.numel() for _, p in tuners.trainable_parameters(model))
    collate_fn = collator(task, tokenizer, args.max_length)
    train_records = synthetic.make_task(task, domain="all", split="train", n=args.train_size, seed=seed)
    test_records = synthetic.make_task(task, domain="all", split="test", n=args.test_size, seed=seed)
    config = TrainConfig(learning_rate=learning_rate, max_steps=args.steps, batch_size=args.batch_size,
                         schedule="linear", warmup_ratio=0.06, eval_every=None, save_every=None,
                         log_every=max(args.steps // 5, 1), seed=seed)
    start = time.perf_counter()
    result = train(model, train_records, collate_fn, config, progress=False)
    seconds = time.perf_counter() - start
    scores = evaluate(model, task, test_records, collate_fn)
    losses = [row["loss"] for row in result.history if "loss" in row]
    return {"task": task, "method": method, "seed": seed, "trainable_parameters": trainable,
            "train_seconds": seconds, "final_loss": losses[-1] if losses else None, **scores}


def main_metric(task: str) -> str:
    return "entity_f1" if task == "ner" else "accuracy"


def summarize(rows: list[dict]) -> dict:
    table: dict = {}
    for row in rows:
        metric = main_metric(row["task"])
        cell = table.setdefault(row["task"], {}).setdefault(row["method"], {"values": [], "metric": metric,
                                                                                "trainable": row["trainable_parameters"]})
        cell["values"].append(row[metric])
    for cells in table.values():
        for cell in cells.values():
            cell["mean"] = statistics.mean(cell["values"])
            cell["std"] = statistics.stdev(cell["values"]) if len(cell["values"]) > 1 else 0.0
    return table


def markdown(table: dict, args) -> str:
    lines = ["# P-Tuning v2 vs prompt tuning vs full fine-tuning (all-MiniLM-L6-v2)", "",
             f"{args.steps} steps x batch {args.batch_size}, {args.train_size} training / {args.test_size} test records "
             f"(held-out entities), max length {args.max_length}, {args.num_virtual_tokens} virtual tokens, "
             f"seeds {args.seeds}; mean (std over seeds). Classification: accuracy; NER: entity F1 (seqeval).", "",
             "| task | metric | full FT | prompt tuning | P-Tuning v2 | trainable (full / PT / PT v2) |",
             "|---|---|---|---|---|---|"]
    for task, cells in table.items():
        values = [f"{cells[m]['mean']:.3f} ({cells[m]['std']:.3f})" if m in cells else "-" for m in METHODS]
        trainable = " / ".join(f"{cells[m]['trainable']:,}" if m in cells else "-" for m in METHODS)
        lines.append(f"| {task} | {next(iter(cells.values()))['metric']} | " + " | ".join(values) + f" | {trainable} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(table)
    width = 0.25
    figure, axis = plt.subplots(figsize=(1.8 + 2.2 * len(tasks), 3.4))
    for index, method in enumerate(METHODS):
        means = [table[t].get(method, {}).get("mean", 0.0) for t in tasks]
        stds = [table[t].get(method, {}).get("std", 0.0) for t in tasks]
        axis.bar([i + (index - 1) * width for i in range(len(tasks))], means, width, yerr=stds, label=method)
    axis.set_xticks(range(len(tasks)), [f"{t}\n({main_metric(t)})" for t in tasks])
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("test score")
    axis.set_title("all-MiniLM-L6-v2: full FT, prompt tuning, P-Tuning v2", fontsize=9)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["ner", "urgency", "domain_classification"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=1600)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            for method in args.methods:
                rows.append(run(task, method, seed, args))
                print(json.dumps(rows[-1]), flush=True)
                write(rows, args)  # after every run: an interrupted comparison keeps what it measured


def write(rows: list[dict], args) -> None:
    table = summarize(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "p_tuning_v2_comparison.json").write_text(json.dumps({"args": vars(args), "runs": rows,
                                                                     "summary": table}, indent=2) + "\n")
    (RESULTS / "p_tuning_v2_comparison.md").write_text(markdown(table, args))
    plot(table, RESULTS / "p_tuning_v2_comparison.png")


if __name__ == "__main__":
    main()
