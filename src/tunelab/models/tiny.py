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

import hashlib
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
    n_documents: int = 6000  # documents about the world's own (train-split) entities
    n_copying_documents: int = 0  # documents about fresh entities, answerable only by copying (see _corpora)
    attention_bias: bool = False  # q/k/v/o biases: position-only attention is then one bias away
    previous_token_heads: int = 0  # layer-0 heads initialised to attend to the previous token (see below)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    min_lr_ratio: float = 0.0


WEIGHTS_DIR = Path(__file__).parent / "weights"  # pretrained presets shipped in the package (bf16)
BACKGROUND_SHARE = 0.15  # share of pretraining documents that are other-domain encyclopedic background

PRESETS: dict[str, TinySpec] = {
    # ~3.4M parameters. 3,000 steps of 8 x 256 tokens (about 14 minutes on 2 idle cores): longer than a
    # quickstart can wait for, so the seed-0 weights ship with the package (models/weights/) and
    # `tunelab pretrain tiny-llama --force` remakes them. Most of its corpus is about fresh entities
    # (answerable only by reading), and it starts with previous-token heads: with both, reading out of
    # the context appears after ~1,750 steps; without them it had not appeared after 1,250 (see README's
    # "Built-in models").
    "tiny-llama": TinySpec(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=688,
                           block_size=256, batch_size=8, steps=3000, learning_rate=2e-3, n_documents=2000,
                           n_copying_documents=26000, attention_bias=True, previous_token_heads=4,
                           adam_betas=(0.9, 0.95), min_lr_ratio=0.1),
    # ~2.1x larger (7.3M), for distillation experiments (teacher -> tiny-llama): tiny-llama's depth
    # (4 layers, where reading from the context is known to appear in time), 1.5x its width and heads
    # (head size 32 kept), the learning rate scaled down with the width. Pretraining took 4,244 s on a
    # shared 2-core machine, so the seed-0 weights ship (14.6 MB bf16). Measured 2026-11-30: held-out
    # perplexity 2.66 (tiny-llama 2.64) and, under the same fine-tuning (configs/teacher_gap.yaml, 3
    # seeds), 0.498 +- 0.030 vs tiny-llama's 0.481 +- 0.067: only marginally stronger. A first try
    # (320 wide, 6 layers, lr 2e-3) was weaker (0.414 +- 0.104): depth slowed its pretraining down.
    "tiny-llama-teacher": TinySpec(
        hidden_size=384, num_layers=4, num_heads=12, num_kv_heads=6, intermediate_size=1024,
        block_size=256, batch_size=8, steps=3000, learning_rate=1.5e-3, n_documents=2000,
        n_copying_documents=26000, attention_bias=True, previous_token_heads=4,
        adam_betas=(0.9, 0.95), min_lr_ratio=0.1,
    ),
}


def cache_dir(name: str, seed: int = 0, home: Path | None = None) -> Path:
    """Where preset ``name`` pretrained with ``seed`` lives."""
    suffix = "" if seed == 0 else f"-seed{seed}"
    return (home or tunelab_home()) / "models" / f"{name}{suffix}"


def is_cached(name: str, seed: int = 0, home: Path | None = None) -> bool:
    """Whether the cache holds ``name`` pretrained with today's preset. A cache made by an older tunelab
    with another spec (shape, corpus, budget) is stale: using it would silently compare other weights."""
    report = cache_dir(name, seed, home) / "pretrain.json"
    if not report.exists():
        return False
    try:
        cached_spec = json.loads(report.read_text()).get("spec")
    except (OSError, ValueError):
        return False
    return name not in PRESETS or cached_spec == json.loads(json.dumps(asdict(PRESETS[name])))


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Fit a byte-level BPE tokenizer (GPT-2 style: no unknown characters) on ``texts``.

    Every word is tokenized in its space-prefixed form, also at the start of a text and after a
    newline (a space is added there before tokenizing). Without that, a value is one token inside a
    sentence (``" nausea"``) and others at the start of an answer (``"n" "ausea"``), so copying it out
    of the context is not the identity on tokens and a small model does not learn it.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Replace(Regex(r"\n(?=[^ \n])"), "\n ")
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
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
        attention_bias=spec.attention_bias,
    )
    model = LlamaForCausalLM(config)
    if spec.previous_token_heads:
        previous_token_init(model, heads=range(0, 2 * spec.previous_token_heads, 2))
    return model


def previous_token_init(model: LlamaForCausalLM, heads, scale: float = 4.0) -> LlamaForCausalLM:
    """Make layer-0 ``heads`` attend to the previous position from the first step (needs q/k biases).

    Copying a span out of the context ("induction": find the earlier occurrence of the current token,
    predict what followed it) needs a head that moves each token's identity one position on, and a later
    head that matches on it. Learned from scratch, the pair forms abruptly after a long plateau (Olsson
    et al., 2022). With RoPE the score of query position i on key position j is

        s(i, j) = Σ_p |q_p| |k_p| cos(φ(k_p) − φ(q_p) − (i − j) θ_p),   θ_p = base^(−2p/d)

    over the rotary pairs p. Setting the q bias to angle 0 and the k bias to angle θ_p in every pair makes
    the bias part of s maximal at i − j = 1 for all pairs at once: a previous-token head, before any
    training, whatever the tokens (content terms are small at initialisation). Training is free to
    change it. Measured on repeated random sequences (8-48 tokens, 4 layers): induction at ~450 steps
    instead of ~900 with q/k biases alone.
    """
    cfg = model.config
    attn = model.model.layers[0].self_attn
    if attn.q_proj.bias is None:
        raise ModelError("previous_token_init needs attention biases (LlamaConfig(attention_bias=True))")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (d/2,)
    half = head_dim // 2  # transformers' rotate_half layout: pair p is (p, p + d/2)
    with torch.no_grad():
        for h in heads:
            kv = h // group
            q_bias = torch.zeros(head_dim)
            q_bias[:half] = 1.0
            k_bias = torch.cat([torch.cos(inv_freq), torch.sin(inv_freq)])
            attn.q_proj.bias[h * head_dim:(h + 1) * head_dim] = scale * q_bias
            attn.k_proj.bias[kv * head_dim:(kv + 1) * head_dim] = scale * k_bias
    return model


def pack_blocks(texts: list[str], tokenizer: PreTrainedTokenizerFast, block_size: int) -> torch.Tensor:
    """Tokenize documents, join them with EOS and cut into full blocks: (n_blocks, block_size)."""
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // block_size
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def pack_documents(texts: list[str], tokenizer: PreTrainedTokenizerFast,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack whole documents into blocks that start at a document start: ``(input_ids, labels)``.

    A document that does not fit in what is left of a block starts the next one (the rest is padding,
    label -100); a document longer than a block is cut into block-sized pieces. Unlike
    :func:`pack_blocks`, no question is separated from the note it is answered from, so copying
    from the context is always possible, and so always rewarded. Shapes: ``(n_blocks, block_size)``.
    """
    pad = tokenizer.pad_token_id
    rows: list[list[int]] = [[]]
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        document = encoded + [tokenizer.eos_token_id]
        if len(rows[-1]) + len(document) > block_size and rows[-1]:
            rows.append([])
        for start in range(0, len(document), block_size):
            if len(rows[-1]) == block_size:
                rows.append([])
            rows[-1].extend(document[start:start + block_size])
    input_ids = torch.full((len(rows), block_size), pad, dtype=torch.long)
    labels = torch.full((len(rows), block_size), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = torch.tensor(row)
    return input_ids, labels


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
    if spec.n_copying_documents:
        pretrain_docs += synthetic.copying_corpus(synthetic.default_world(seed), "general",
                                                  spec.n_copying_documents, seed)
    random.Random(seed).shuffle(pretrain_docs)
    heldout_docs = synthetic.corpus(domains=("general",), n_documents=400, seed=seed, split="test")
    # The tokenizer sees every domain so that domain words are not shredded into bytes later.
    tokenizer_docs = synthetic.corpus(domains=synthetic.DOMAINS, n_documents=4000, seed=seed, split="train")
    return pretrain_docs, heldout_docs, tokenizer_docs


def corpus_fingerprint(spec: TinySpec, seed: int = 0) -> str:
    """SHA-256 of every text the preset is built from (tokenizer, pretraining and held-out corpora).

    Shipped weights record it: when the world's generator changes, the fingerprint changes and the
    weights no longer describe the world (a test compares the two).
    """
    return _fingerprint(_corpora(spec, seed))


def _fingerprint(corpora: tuple[list[str], ...]) -> str:
    """SHA-256 of already built corpora (what :func:`corpus_fingerprint` hashes; no second build)."""
    digest = hashlib.sha256()
    for docs in corpora:
        for doc in docs:
            digest.update(doc.encode())
            digest.update(b"\0")
        digest.update(b"\1")
    return digest.hexdigest()


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
    if seed == 0 and steps is None and not force and (WEIGHTS_DIR / name / "pretrain.json").exists():
        _install_shipped(name, target)
        return target
    from tunelab.train import TrainConfig, train

    spec = PRESETS[name]
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    corpora = _corpora(spec, seed)
    pretrain_docs, heldout_docs, tokenizer_docs = corpora
    tokenizer = train_tokenizer(tokenizer_docs, spec.vocab_size)
    train_blocks, train_labels = pack_documents(pretrain_docs, tokenizer, spec.block_size)
    heldout_blocks = pack_blocks(heldout_docs, tokenizer, spec.block_size)
    model = build_model(spec, tokenizer, seed)

    config = TrainConfig(
        learning_rate=spec.learning_rate, max_steps=steps or spec.steps, batch_size=spec.batch_size,
        schedule="cosine", warmup_ratio=0.03, weight_decay=0.01, max_grad_norm=1.0,
        adam_betas=spec.adam_betas, min_lr_ratio=spec.min_lr_ratio,
        eval_every=None, save_every=None, log_every=20, seed=seed,
    )
    records = [{"input_ids": block, "labels": labels} for block, labels in zip(train_blocks, train_labels, strict=True)]
    result = train(model, records, _collate_blocks, config, progress=progress)
    heldout_ppl = model_perplexity(model, heldout_blocks)
    unigram_ppl = unigram_perplexity(train_blocks[train_labels != -100], heldout_blocks, len(tokenizer))

    report = {
        "name": name, "seed": seed, "spec": asdict(spec), "steps": result.steps,
        "corpus_fingerprint": _fingerprint(corpora),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": int(result.steps * spec.batch_size * spec.block_size),
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "heldout_perplexity": heldout_ppl, "unigram_perplexity": unigram_ppl,
        "perplexity_ratio": unigram_ppl / heldout_ppl, "seconds": time.perf_counter() - started,
    }
    _write_atomically(target, model, tokenizer, report)
    return target


def _install_shipped(name: str, target: Path) -> None:
    """Copy the weights shipped in the package into the cache (bf16 on disk, float32 in the cache)."""
    from transformers import AutoTokenizer

    source = WEIGHTS_DIR / name
    model = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    report = json.loads((source / "pretrain.json").read_text()) | {"source": "shipped"}
    _write_atomically(target, model, tokenizer, report)


def ship(name: str, home: Path | None = None) -> Path:
    """Write the cached seed-0 preset ``name`` into the package as bf16 (``models/weights/<name>/``).

    Run after ``tunelab pretrain NAME --force``; the copy records the corpus fingerprint and the
    held-out perplexity of the bf16 weights themselves.
    """
    from transformers import AutoTokenizer

    source = cache_dir(name, 0, home)
    report = pretrain_report(name, 0, home)
    spec = PRESETS[name]
    model = LlamaForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(source)
    corpora = _corpora(spec, 0)
    rounded = LlamaForCausalLM.from_pretrained(source, dtype=torch.bfloat16).float()
    report["heldout_perplexity_bf16"] = model_perplexity(rounded, pack_blocks(corpora[1], tokenizer, spec.block_size))
    report["corpus_fingerprint"] = _fingerprint(corpora)
    _write_atomically(WEIGHTS_DIR / name, model, tokenizer, report)
    return WEIGHTS_DIR / name


def _collate_blocks(records: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack([r["input_ids"] for r in records])  # (B, T)
    labels = torch.stack([r["labels"] for r in records]) if "labels" in records[0] else input_ids
    return {"input_ids": input_ids, "labels": labels}  # (B, T) each; padding is labelled -100


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
