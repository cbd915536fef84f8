"""LoRA+ convergence on the built-in world: steps for LoRA+ to reach LoRA's final eval loss.

Setup: the pretrained ``tiny-llama`` preset (pretrained into ``$TUNELAB_HOME`` on first use, ~3 min),
medical-domain summarization from ``tunelab.data.synthetic`` (held-out validation split), LoRA on
every linear layer of the blocks (r = 8, alpha = 16), AdamW, constant learning rate after a short
warmup. Three runs, same seed, data order and steps:

- ``lora``: plain LoRA at ``lr``;
- ``loraplus``: LoRA+ at the same ``lr`` with ``B`` at ``lr x 16`` (the paper's ratio);
- ``lora_4x``: plain LoRA at ``4 x lr`` (a control: is LoRA+ just a larger rate?).

Reported: LoRA's final eval loss ``L``; the first step at which each other run's eval loss is ``<= L``
(linearly interpolated between evaluations); the ratio ``steps_loraplus / steps_lora`` (< 1: faster).

    TUNELAB_HOME=/tmp/tunelab_home_shared python benchmarks/loraplus_convergence.py

Writes ``benchmarks/results/loraplus_convergence.json`` and ``.md`` (``--model random``:
``loraplus_convergence_random.*``, the same shape randomly initialised, no pretraining needed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(kind: str):
    """``pretrained``: the tiny-llama preset (cached under $TUNELAB_HOME); ``random``: the same shape, random."""
    from tunelab.models import tiny, zoo

    if kind == "pretrained":
        return zoo.load("tiny-llama", progress=False)
    from tunelab.data import synthetic

    spec = tiny.PRESETS["tiny-llama"]
    tokenizer = tiny.train_tokenizer(synthetic.corpus(domains=synthetic.DOMAINS, n_documents=1000, seed=0),
                                     spec.vocab_size)
    return tiny.build_model(spec, tokenizer, seed=0), tokenizer


def run(name: str, lr: float, ratio: float | None, steps: int, eval_every: int, data, threads: int,
        kind: str) -> dict:
    from tunelab import tuners
    from tunelab.data.collate import SFTCollator
    from tunelab.train import TrainConfig, train

    torch.set_num_threads(threads)
    train_records, eval_records = data
    model, tokenizer = load_model(kind)
    tuners.apply(model, "lora", r=8, lora_alpha=16, target_modules=TARGETS)
    groups = tuners.loraplus_param_groups(model, lr, ratio) if ratio else None
    config = TrainConfig(learning_rate=lr, max_steps=steps, batch_size=8, schedule="constant", warmup_steps=5,
                         eval_every=eval_every, save_every=steps, log_every=eval_every, seed=0)
    started = time.perf_counter()
    result = train(model, train_records, SFTCollator(tokenizer, max_length=192), config, eval_records=eval_records,
                   param_groups=groups, progress=False)
    curve = [(r["step"], r["eval_loss"]) for r in result.history if "eval_loss" in r]
    return {"name": name, "lr": lr, "loraplus_lr_ratio": ratio, "curve": curve, "final_eval_loss": curve[-1][1],
            "seconds": time.perf_counter() - started}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step (linear interpolation between evaluations) with eval loss <= target; None if never."""
    previous = (0, float("inf"))
    for step, loss in curve:
        if loss <= target:
            if previous[1] == float("inf"):
                return float(step)
            fraction = (previous[1] - target) / (previous[1] - loss)
            return previous[0] + fraction * (step - previous[0])
        previous = (step, loss)
    return None


def markdown(record: dict) -> str:
    rows = record["runs"]
    lines = [f"# LoRA+ convergence ({record['model']} tiny-llama, medical summarization)", "",
             f"{record['steps']} steps, batch 8, eval every {record['eval_every']} steps on "
             f"{record['eval_records']} held-out records; LoRA r = 8, alpha = 16 on every block linear layer. "
             f"Target = LoRA's final eval loss {record['target_loss']:.4f}.", "",
             "| run | lr (A) | B ratio | final eval loss | steps to reach LoRA's final loss | ratio to LoRA |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        reached = row["steps_to_target"]
        ratio = f"{reached / record['steps']:.2f}" if reached is not None else "not reached"
        lines.append(f"| {row['name']} | {row['lr']:g} | {row['loraplus_lr_ratio'] or 1:g} | "
                     f"{row['final_eval_loss']:.4f} | {reached if reached is None else round(reached, 1)} | {ratio} |")
    lines += ["", f"**LoRA+ reaches LoRA's final eval loss in {record['loraplus_step_ratio']:.2f}x the steps** "
              "(lower is faster)." if record["loraplus_step_ratio"] is not None else
              "", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=("pretrained", "random"), default="pretrained",
                        help="the pretrained tiny-llama preset, or the same shape randomly initialised")
    args = parser.parse_args()
    os.environ.setdefault("TUNELAB_HOME", "/tmp/tunelab_home_shared")
    from tunelab.data import synthetic

    train_records = synthetic.make_task("summarization", domain="medical", split="train", n=1000, seed=0)
    eval_records = synthetic.make_task("summarization", domain="medical", split="validation", n=64, seed=0)
    data = (train_records, eval_records)
    settings = [("lora", args.lr, None), ("loraplus", args.lr, 16.0), ("lora_4x", 4 * args.lr, None)]
    runs = [run(name, lr, ratio, args.steps, args.eval_every, data, args.threads, args.model)
            for name, lr, ratio in settings]
    target = runs[0]["final_eval_loss"]
    for row in runs:
        row["steps_to_target"] = steps_to_reach(row["curve"], target) if row["name"] != "lora" else float(args.steps)
    plus = runs[1]["steps_to_target"]
    record = {"benchmark": "loraplus_convergence", "model": args.model, "steps": args.steps, "eval_every": args.eval_every,
              "eval_records": len(eval_records), "target_loss": target, "runs": runs,
              "loraplus_step_ratio": plus / args.steps if plus is not None else None,
              "torch": torch.__version__, "tunelab_home": os.environ["TUNELAB_HOME"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "loraplus_convergence" if args.model == "pretrained" else "loraplus_convergence_random"
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
