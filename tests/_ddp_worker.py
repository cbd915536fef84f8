"""Worker for tests/test_ddp.py and benchmarks/ddp_cpu.py: one LoRA training of a tiny random Llama.

    python _ddp_worker.py OUTPUT_DIR --batch-size B [--resume] [--kill-at STEP] [--steps N]
    python -m torch.distributed.run --nproc_per_node 2 _ddp_worker.py OUTPUT_DIR --batch-size B/2

``--batch-size`` is the *per-process* micro-batch: the global batch of a step is
``batch_size * processes * grad_accum``, so a 2-process run with half the batch sees the same records
per step as the 1-process run (``EpochSampler`` gives each rank its strided share of one global batch).

The objective learns a loss weight in its own module (Kendall et al.'s uncertainty weighting,
``L' = exp(-2s) L / 2 + s``), so the test also covers objective modules under DDP: rank 0's initial
value is broadcast and their gradients are averaged like the model's. Every sequence has the same
length and dropout is zero, so each rank's token-mean loss averages to exactly the global one.

Each rank writes ``rank-<r>.json``: how many eval batches it computed (evaluation runs on the main
process only). ``--no-module-sync`` is the negative control of the objective-module fix. ``--kill-at S`` SIGKILLs rank 1 once step ``S`` is logged (the launcher then stops the
other rank); ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab import tuners
from tunelab.train import TrainConfig, train
from tunelab.train.objective import BaseObjective, LossOutput

SEQUENCE_LENGTH = 12
VOCAB = 96


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    torch.manual_seed(1)  # the LoRA init
    return tuners.apply(model, "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def build_records(count: int, seed: int) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    # a learnable pattern (each token follows from the previous one) plus noise
    starts = torch.randint(1, VOCAB, (count,), generator=generator)
    steps = torch.randint(1, 4, (count,), generator=generator)
    return [{"ids": [(int(a) + int(b) * t) % (VOCAB - 1) + 1 for t in range(SEQUENCE_LENGTH)]}
            for a, b in zip(starts, steps, strict=True)]


def collate(records: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([r["ids"] for r in records])  # (B, T), all of length T
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


class WeightedLM(BaseObjective):
    """Causal-LM loss with a learned uncertainty weight ``s`` in an objective module."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Module()
        self.weight.log_sigma = torch.nn.Parameter(torch.tensor(0.3))
        self.eval_batches = 0

    def make_collator(self, tokenizer, labels, **_):
        return collate

    def modules(self):
        return [self.weight]

    def loss(self, model, batch) -> LossOutput:
        nll = model(**batch).loss
        if not model.training:
            self.eval_batches += 1
        s = self.weight.log_sigma
        return LossOutput(torch.exp(-2 * s) * nll / 2 + s, {"nll": nll.item(), "sigma": float(s.detach().exp())})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--no-module-sync", action="store_true", help="negative control: skip averaging the "
                        "objective modules' gradients over ranks (what the loop did before issue 17)")
    args = parser.parse_args()
    if args.no_module_sync:
        from tunelab.train import engine

        engine.average_module_grads = lambda modules, accelerator: None
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))

    def kill(record: dict) -> None:
        if rank == 1 and record.get("step") == args.kill_at and "loss" in record:
            os.kill(os.getpid(), signal.SIGKILL)

    objective = WeightedLM()
    config = TrainConfig(learning_rate=1e-2, max_steps=args.steps, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, warmup_steps=2, eval_every=5, save_every=4, log_every=1,
                         max_eval_batches=2, eval_batch_size=8, seed=7)
    result = train(build_model(), build_records(40, seed=3), objective, config,
                   eval_records=build_records(16, seed=4), output_dir=args.output_dir, resume=args.resume,
                   progress=False, callbacks=[kill] if args.kill_at else None)
    (args.output_dir / f"rank-{rank}.json").write_text(json.dumps(
        {"eval_batches": objective.eval_batches, "train_seconds": result.train_seconds, "steps": result.steps,
         "sigma": float(objective.weight.log_sigma.exp())}))


if __name__ == "__main__":
    main()
