"""Tiny *random* models for tests and benchmarks: built from small configs, seeded, no downloads.

Four shapes of network that PEFT methods must handle:

- :func:`toy_mlp` - a plain ``nn.Module`` (no ``config``): Linear layers only;
- :func:`tiny_llama` - ``LlamaForCausalLM`` (Linear projections, grouped-query attention, RMSNorm);
- :func:`tiny_bert` - ``BertForSequenceClassification`` (an encoder with a classification head);
- :func:`tiny_gpt2` - ``GPT2LMHeadModel`` (transformers' ``Conv1D``, weights stored transposed, tied head).

Each has a few thousand to ~30k parameters, so a forward pass costs well under a millisecond of
arithmetic. Dropout is zero in the transformer configs so that training-mode outputs are
deterministic; builders fork the RNG, so they neither depend on nor disturb the global seed.
:func:`example_batch` returns a matching batch with labels (``model(**batch)`` gives ``.loss`` and
``.logits`` for every builder).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.modeling_outputs import SequenceClassifierOutput

VOCAB_SIZE = 64  # tiny vocabulary: token ids 0..63
HIDDEN = 32
NUM_LABELS = 3


class ToyBlock(nn.Module):
    """A residual MLP block: ``x + down(relu(up(x)))``."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))  # (B, hidden)


class ToyMLP(nn.Module):
    """``embed -> blocks -> classifier`` on float features; HF-style output with ``loss``/``logits``."""

    def __init__(self, in_features: int = 16, hidden: int = HIDDEN, depth: int = 2, num_labels: int = NUM_LABELS) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(ToyBlock(hidden, 2 * hidden) for _ in range(depth))
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        hidden = torch.tanh(self.embed(x))  # (B, hidden)
        for block in self.blocks:
            hidden = block(hidden)
        logits = self.classifier(hidden)  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def toy_mlp(seed: int = 0) -> ToyMLP:
    """A ~7k-parameter MLP classifier on 16 float features."""
    return _seeded(seed, ToyMLP)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A ~20k-parameter ``LlamaForCausalLM``: 2 layers, 4 query heads sharing 2 key/value heads."""
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return _seeded(seed, lambda: LlamaForCausalLM(config))


def tiny_bert(seed: int = 0, num_labels: int = NUM_LABELS) -> BertForSequenceClassification:
    """A ~30k-parameter ``BertForSequenceClassification``: 2 layers, 4 heads."""
    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return _seeded(seed, lambda: BertForSequenceClassification(config))


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A ~30k-parameter ``GPT2LMHeadModel``: 2 layers, 4 heads, ``Conv1D`` projections, tied head."""
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return _seeded(seed, lambda: GPT2LMHeadModel(config))


def tiny_clip(seed: int = 0) -> nn.Module:
    """A ~40k-parameter CLIP zero-shot classifier over 4 classes, 16 x 16 images (:mod:`tunelab.multimodal`)."""
    from tunelab.multimodal.clip import tiny_random_classifier

    return tiny_random_classifier(seed)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "toy_mlp": toy_mlp, "tiny_llama": tiny_llama, "tiny_bert": tiny_bert, "tiny_gpt2": tiny_gpt2,
    "tiny_clip": tiny_clip,
}


def example_batch(model: nn.Module, batch_size: int = 2, seq_len: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch with labels for a model built here (``model(**batch).loss`` works)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, ToyMLP):
        features = model.embed.in_features
        return {"x": torch.randn(batch_size, features, generator=generator),
                "labels": torch.randint(0, model.classifier.out_features, (batch_size,), generator=generator)}
    if hasattr(model, "class_input_ids"):  # a CLIP ZeroShotClassifier: images and class labels
        from tunelab.multimodal.clip import example_batch as clip_batch

        return clip_batch(model, batch_size, seed)
    input_ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=generator)  # (B, T)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if getattr(model.config, "num_labels", None) and "SequenceClassification" in type(model).__name__:
        batch["labels"] = torch.randint(0, model.config.num_labels, (batch_size,), generator=generator)
    else:
        batch["labels"] = input_ids.clone()  # causal LM: the model shifts labels itself
    return batch
