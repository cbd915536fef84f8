"""Tiny pretrained Llama models, built and pretrained by tunelab itself on its built-in world.

Why: tests, the quickstart and every offline experiment need a *pretrained* decoder, and this machine
cannot download one. So tunelab trains its own: a byte-level BPE tokenizer fitted on the built-in corpus
of all four domains (so medical or legal words still tokenize sensibly), and a small
``LlamaForCausalLM`` pretrained with the ordinary next-token objective on the **general** domain
(its task documents and encyclopedic text) plus a minority of encyclopedic background about the other
domains (see ``_corpora``).
Fine-tuning it on the medical domain is therefore real domain adaptation.

Pretraining objective (causal LM, packed blocks of ``block_size`` tokens):

    L(θ) = − (1/N) Σ_t log p_θ(x_t | x_<t)

Quality check, recorded in ``pretrain.json`` beside the weights: the held-out perplexity
``exp(L)`` on documents about entities never seen in training, against the perplexity of a unigram
model (add-one smoothed token frequencies) of the same training corpus. A model that learnt the
world's structure, not only word frequencies, is far below the unigram perplexity.

Layout of the cache (``$TUNELAB_HOME/models/<name>/``): ``config.json``, ``model.safetensors``,
tokenizer files, ``pretrain.json``. Written to a temporary directory and renamed, so a killed
pretraining never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tunelab.errors import ModelError
from tunelab.utils import seed_everything, tunelab_home

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class TinySpec:
    """Architecture and pretraining budget of one tiny preset."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 2048  # enough for the world's vocabulary; keeps the embedding a small share
    block_size: int = 128  # pretraining context; fine-tuning may use up to max_positions
    max_positions: int = 512
    steps: int = 400  # pretraining optimizer steps: about 2 minutes on 2 idle cores
    batch_size: int = 16
    learning_rate: float = 3e-3  # tiny models tolerate (and need) a large LR to learn in minutes
    n_documents: int = 6000


BACKGROUND_SHARE = 0.15  # share of pretraining documents that are other-domain encyclopedic background

PRESETS: dict[str, TinySpec] = {
    # ~3.7M parameters; pretrains in about two minutes on 2 CPU cores.
    "tiny-llama": TinySpec(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=688),
    # ~4x larger, for distillation experiments (teacher → tiny-llama).
    "tiny-llama-teacher": TinySpec(
        hidden_size=384, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1024,
        steps=600, learning_rate=2e-3,
    ),
}


def cache_dir(name: str, seed: int = 0, home: Path | None = None) -> Path:
    """Where preset ``name`` pretrained with ``seed`` lives."""
    suffix = "" if seed == 0 else f"-seed{seed}"
    return (home or tunelab_home()) / "models" / f"{name}{suffix}"


def is_cached(name: str, seed: int = 0, home: Path | None = None) -> bool:
    return (cache_dir(name, seed, home) / "pretrain.json").exists()


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Fit a byte-level BPE tokenizer (GPT-2 style: no unknown characters) on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.model_max_length = 512
    return fast


def build_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    seed_everything(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def pack_blocks(texts: list[str], tokenizer: PreTrainedTokenizerFast, block_size: int) -> torch.Tensor:
    """Tokenize documents, join them with EOS and cut into full blocks: (n_blocks, block_size)."""
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // block_size
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one smoothed unigram model of the training tokens on the eval tokens."""
    counts = Counter(train_blocks.flatten().tolist())
    total = train_blocks.numel() + vocab_size
    nll = 0.0
    eval_tokens = eval_blocks[:, 1:].flatten().tolist()  # the same positions the LM predicts
    for token in eval_tokens:
        nll -= math.log((counts.get(token, 0) + 1) / total)
    return math.exp(nll / len(eval_tokens))


@torch.no_grad()
def model_perplexity(model: LlamaForCausalLM, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Token-weighted perplexity of ``model`` over packed ``blocks``."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        loss = model(input_ids=batch, labels=batch).loss  # mean over batch.size(0) * (T - 1) tokens
        n = batch.size(0) * (batch.size(1) - 1)
        nll += loss.item() * n
        count += n
    return math.exp(nll / count)


def _corpora(spec: TinySpec, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Pretraining, held-out and tokenizer corpora.

    Pretraining text is the general domain (encyclopedic paragraphs *and* task-formatted documents)
    plus a minority of encyclopedic background paragraphs about the other domains' training entities,
    as a web corpus has some medical or legal text. Without that background, the embeddings of tokens
    that occur only in other domains would stay random, and no adapter that keeps embeddings frozen
    could ever produce them. The model never sees a medical/legal/technical *task* before fine-tuning.
    """
    import random

    from tunelab.data import synthetic

    others = tuple(d for d in synthetic.DOMAINS if d != "general")
    n_background = int(spec.n_documents * BACKGROUND_SHARE)
    pretrain_docs = synthetic.corpus(domains=("general",), n_documents=spec.n_documents - n_background,
                                     seed=seed, split="train")
    pretrain_docs += synthetic.corpus(domains=others, n_documents=n_background, seed=seed, split="train",
                                      kinds=("encyclopedia",))
    random.Random(seed).shuffle(pretrain_docs)
    heldout_docs = synthetic.corpus(domains=("general",), n_documents=400, seed=seed, split="test")
    # The tokenizer sees every domain so that domain words are not shredded into bytes later.
    tokenizer_docs = synthetic.corpus(domains=synthetic.DOMAINS, n_documents=4000, seed=seed, split="train")
    return pretrain_docs, heldout_docs, tokenizer_docs


def pretrain(name: str = "tiny-llama", home: Path | None = None, seed: int = 0, progress: bool = True,
             steps: int | None = None, force: bool = False) -> Path:
    """Pretrain preset ``name`` on the general-domain corpus and cache it; returns the cache directory.

    Deterministic for a seed. ``steps`` overrides the preset's budget (tests use fewer).
    """
    if name not in PRESETS:
        raise ModelError(f"unknown tiny preset {name!r}; choose one of: {', '.join(PRESETS)}")
    target = cache_dir(name, seed, home)
    if is_cached(name, seed, home) and not force:
        return target
    from tunelab.train import TrainConfig, train

    spec = PRESETS[name]
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pretrain_docs, heldout_docs, tokenizer_docs = _corpora(spec, seed)
    tokenizer = train_tokenizer(tokenizer_docs, spec.vocab_size)
    train_blocks = pack_blocks(pretrain_docs, tokenizer, spec.block_size)
    heldout_blocks = pack_blocks(heldout_docs, tokenizer, spec.block_size)
    model = build_model(spec, tokenizer, seed)

    config = TrainConfig(
        learning_rate=spec.learning_rate, max_steps=steps or spec.steps, batch_size=spec.batch_size,
        schedule="cosine", warmup_ratio=0.05, weight_decay=0.01, max_grad_norm=1.0,
        eval_every=None, save_every=None, log_every=20, seed=seed,
    )
    records = [{"input_ids": block} for block in train_blocks]
    result = train(model, records, _collate_blocks, config, progress=progress)
    heldout_ppl = model_perplexity(model, heldout_blocks)
    unigram_ppl = unigram_perplexity(train_blocks, heldout_blocks, len(tokenizer))

    report = {
        "name": name, "seed": seed, "spec": asdict(spec), "steps": result.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": int(result.steps * spec.batch_size * spec.block_size),
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "heldout_perplexity": heldout_ppl, "unigram_perplexity": unigram_ppl,
        "perplexity_ratio": unigram_ppl / heldout_ppl, "seconds": time.perf_counter() - started,
    }
    _write_atomically(target, model, tokenizer, report)
    return target


def _collate_blocks(records: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack([r["input_ids"] for r in records])  # (B, T)
    return {"input_ids": input_ids, "labels": input_ids}


def _write_atomically(target: Path, model, tokenizer, report: dict) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pretrain_report(name: str, seed: int = 0, home: Path | None = None) -> dict:
    """The metrics recorded when the preset was pretrained."""
    return json.loads((cache_dir(name, seed, home) / "pretrain.json").read_text())
