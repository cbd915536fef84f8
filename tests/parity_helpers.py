"""Helpers shared by the parity tests: eval-mode logits and a non-vacuous closeness check."""

from __future__ import annotations

import torch

PARITY_ATOL = 1e-5  # max abs logit difference allowed against the reference implementation


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    return model(**batch).logits


def assert_parity(ours: torch.Tensor, reference: torch.Tensor, base: torch.Tensor, what: str = "adapter") -> None:
    """``ours`` equals ``reference`` within PARITY_ATOL, and the reference really differs from ``base``."""
    assert (reference - base).abs().max() > 1e-2 * base.abs().max(), f"{what} had no effect: vacuous parity"
    assert (ours - reference).abs().max().item() <= PARITY_ATOL


def _task_model(model_class: str, base: str, seed: int) -> torch.nn.Module:
    """A tiny task model with the architecture of ``testing.<base>`` and a fresh head (PEFT's task types)."""
    import transformers

    from tunelab.models import testing

    config = testing.BUILDERS[base]().config
    config.num_labels = testing.NUM_LABELS
    if config.pad_token_id is None:
        config.pad_token_id = 0  # decoder classifiers find each row's last real token by the pad id
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


TASK_MODELS = {  # name -> builder(seed): the *ForSequenceClassification / *ForTokenClassification heads
    "bert-seq-cls": lambda seed=0: _task_model("BertForSequenceClassification", "tiny_bert", seed),  # classifier
    "bert-token-cls": lambda seed=0: _task_model("BertForTokenClassification", "tiny_bert", seed),  # classifier
    "llama-seq-cls": lambda seed=0: _task_model("LlamaForSequenceClassification", "tiny_llama", seed),  # score
    "gpt2-seq-cls": lambda seed=0: _task_model("GPT2ForSequenceClassification", "tiny_gpt2", seed),  # score
}


def task_batch(model: torch.nn.Module, seed: int = 0) -> dict:
    """input_ids + attention_mask (no labels: these tests compare logits)."""
    from tunelab.models import testing

    batch = testing.example_batch(model, seed=seed)
    return {key: batch[key] for key in ("input_ids", "attention_mask")}
