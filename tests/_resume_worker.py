"""Subprocess worker for tests/test_resume.py: train a tiny random Llama, optionally pausing mid-run.

    python _resume_worker.py OUTPUT_DIR [--resume] [--pause-at STEP] [--wait-for PATH] [--seam]

With ``--pause-at S`` the worker writes ``OUTPUT_DIR/paused`` once step ``S`` is logged and then sleeps,
so that the test can SIGKILL it at a known point between checkpoints. With ``--wait-for PATH`` it
imports everything, then waits until PATH exists before training (the test starts the resuming
process early, so its slow imports overlap the other runs). Everything that shapes the run
(model, data, config) is fixed here, so every invocation trains the same run.

``--seam`` trains through an objective with its own trainable module and state (a learned
uncertainty weight and a running loss average) and a non-default sampler (per-group temperature
sampling): the resumed run must still match bit for bit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.train import TrainConfig, train
from tunelab.train.objective import BaseObjective, LossOutput
from tunelab.train.samplers import GroupSampler

SEQUENCE_LENGTH = 12
CONFIG = TrainConfig(
    learning_rate=3e-3,
    max_steps=40,
    batch_size=4,
    grad_accum=2,  # 8 records per step over 52 records: epochs roll over mid-run
    schedule="cosine",
    warmup_steps=4,
    weight_decay=0.01,
    max_grad_norm=0.5,
    eval_every=10,
    save_every=5,
    log_every=1,
    seed=3,
)


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.2,  # dropout > 0: the RNG state must be restored exactly
    )
    model = LlamaForCausalLM(config)
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen part, as with adapters
    return model


def build_records(count: int, seed: int) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, SEQUENCE_LENGTH + 1, (count,), generator=generator).tolist()
    return [{"ids": torch.randint(1, 128, (n,), generator=generator).tolist()} for n in lengths]


def collate(records: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    # (B, T) right-padded with 0; padding masked out of attention and loss
    input_ids = torch.zeros(len(records), SEQUENCE_LENGTH, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, record in enumerate(records):
        input_ids[row, : len(record["ids"])] = torch.tensor(record["ids"])
        attention_mask[row, : len(record["ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LearnedWeight(BaseObjective):
    """Kendall et al.'s uncertainty weighting of one loss: L' = exp(-2s) L / 2 + s, s learned.

    ``s`` lives in an objective module (optimizer + checkpoint); ``calls`` and ``running`` are the
    objective's own state (``objective.pt`` in the checkpoint).
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Module()
        self.weight.log_sigma = torch.nn.Parameter(torch.tensor(0.3))
        self.calls, self.running = 0, torch.zeros(())

    def make_collator(self, tokenizer, labels, **_):
        return collate

    def modules(self):
        return [self.weight]

    def loss(self, model, batch) -> LossOutput:
        nll = model(**batch).loss
        s = self.weight.log_sigma
        if model.training:
            self.calls += 1
            self.running = 0.9 * self.running + 0.1 * nll.detach()
        return LossOutput(torch.exp(-2 * s) * nll / 2 + s, {"nll": nll.item(), "sigma": float(s.exp())})

    def state_dict(self):
        return {"calls": self.calls, "running": self.running.clone()}

    def load_state_dict(self, state):
        self.calls, self.running = int(state["calls"]), state["running"].clone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-at", type=int, default=None)
    parser.add_argument("--wait-for", type=Path, default=None)
    parser.add_argument("--seam", action="store_true")
    args = parser.parse_args()
    while args.wait_for is not None and not args.wait_for.exists():
        time.sleep(0.05)
    torch.set_num_threads(1)  # one thread: deterministic reductions, no contention between workers

    def pause(record: dict) -> None:
        if args.pause_at is not None and record["step"] == args.pause_at and "loss" in record:
            (args.output_dir / "paused").write_text(str(record["step"]))
            time.sleep(600)  # wait here for SIGKILL

    records = build_records(52, seed=1)
    objective, sampler = collate, None
    if args.seam:
        objective = LearnedWeight()
        sampler = GroupSampler([range(0, 40), range(40, 52)], CONFIG.batch_size, seed=5, strategy="temperature",
                               temperature=2.0)
    train(
        build_model(),
        records,
        objective,
        CONFIG,
        sampler,
        eval_records=build_records(8, seed=2),
        output_dir=args.output_dir,
        resume=args.resume,
        progress=False,
        callbacks=[pause],
    )


if __name__ == "__main__":
    main()
