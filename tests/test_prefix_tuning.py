"""Prefix tuning: parity with HF PEFT both ways, padding, the KV cache in generation, folding the MLP.

The matrix (test_tuner_matrix.py) covers save/load, disable, unload and training. Here:

- parity: tunelab -> ``save(format="peft")`` -> ``peft.PeftModel.from_pretrained`` gives the same logits
  and loss (with and without ``prefix_projection``), and a PEFT-trained adapter loads into tunelab to the
  same logits. References are PEFT 0.21's own forward passes on a deep copy of the same seeded tiny
  model. For BERT, PEFT 0.21's forward cannot run under transformers 5.2x (``past_key_values`` was
  renamed ``cache``), so the reference is PEFT's ``get_prompt`` passed to the model the way PEFT's
  ``_prefix_tuning_forward`` does, under the new name;
- padding: a left- or right-padded batch gives each example the outputs it has alone;
- generation: greedy decoding with the KV cache equals decoding without it, every generated token
  is the argmax of PEFT's forward logits on the tokens before it (PEFT 0.21's ``generate`` drops the
  prefix under transformers 5.2x, so its generations are no reference), and tunelab's own batched
  greedy decoder agrees;
- the reparameterization: gradients reach E and the MLP; ``fold`` keeps the outputs and drops the MLP.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity_helpers import PARITY_ATOL, assert_parity

from tunelab import tuners
from tunelab.eval.generate import greedy_batch
from tunelab.models import testing
from tunelab.tuners.prompts import prefix

peft = pytest.importorskip("peft")

PADDING_ATOL = 1e-5  # different matmul shapes: float noise only


@torch.no_grad()
def forward(model: torch.nn.Module, **batch):
    model.eval()
    return model(**batch)


EXPORT_CASES = {
    "llama-plain": ("tiny_llama", dict(num_virtual_tokens=3)),
    "llama-projection": ("tiny_llama", dict(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16)),
    "gpt2-projection-default-width": ("tiny_gpt2", dict(num_virtual_tokens=3, prefix_projection=True)),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_peft_loads_our_prefix(case: str, tmp_path) -> None:
    builder, options = EXPORT_CASES[case]
    base = testing.BUILDERS[builder](seed=0)
    batch = testing.example_batch(base)
    model = tuners.apply(copy.deepcopy(base), "prefix_tuning", **options)
    tuners.save(model, tmp_path, format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    ours, theirs = forward(model, **batch), forward(reference, **batch)
    assert_parity(ours.logits, theirs.logits, forward(base, **batch).logits)
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), abs=PARITY_ATOL)
    assert reference.peft_config["default"].prefix_projection == options.get("prefix_projection", False)


@pytest.mark.parametrize("projection", [False, True])
def test_we_load_a_peft_prefix(projection: bool, tmp_path) -> None:
    base = testing.tiny_llama(seed=0)
    batch = testing.example_batch(base)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                     encoder_hidden_size=12)
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    reference.save_pretrained(str(tmp_path))  # PEFT folds the MLP into the saved prompt_embeddings
    ours = tuners.load(copy.deepcopy(base), tmp_path)
    assert_parity(forward(ours, **batch).logits, forward(reference, **batch).logits, forward(base, **batch).logits)
    loaded = tuners.adapters(ours)["default"]
    assert loaded.method == "prefix_tuning" and not loaded.prefix_projection  # folded prefixes, no MLP


def _bert_reference(reference, batch: dict) -> torch.Tensor:
    """PEFT's ``_prefix_tuning_forward`` (get_prompt + one-filled mask) with transformers 5.2x's ``cache`` name."""
    batch_size = batch["input_ids"].shape[0]
    n = reference.peft_config["default"].num_virtual_tokens
    mask = torch.cat([torch.ones(batch_size, n, dtype=torch.long), batch["attention_mask"]], dim=1)
    with torch.no_grad():
        cache = reference.get_prompt(batch_size)
        return reference.get_base_model()(input_ids=batch["input_ids"], attention_mask=mask, cache=cache).logits


def test_bert_prefix_matches_peft_prompt_layout_both_ways(tmp_path) -> None:
    base = testing.tiny_bert(seed=0)
    batch = testing.example_batch(base)
    base_logits = forward(base, **batch).logits
    model = tuners.apply(copy.deepcopy(base), "prefix_tuning", num_virtual_tokens=3, modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.5)
    tuners.save(model, tmp_path / "ours", format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert_parity(forward(model, **batch).logits, _bert_reference(reference, batch), base_logits)
    reference.save_pretrained(str(tmp_path / "theirs"))
    again = tuners.load(copy.deepcopy(base), tmp_path / "theirs")
    assert tuners.adapters(again)["default"].method == "p_tuning_v2"  # SEQ_CLS prefix = P-Tuning v2
    assert_parity(forward(again, **batch).logits, _bert_reference(reference, batch), base_logits)


def _padded(rows: list[torch.Tensor], side: str) -> dict:
    length = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[index, span], mask[index, span] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("builder,side", [("tiny_llama", "left"), ("tiny_llama", "right"), ("tiny_gpt2", "left"),
                                          ("tiny_gpt2", "right"), ("tiny_bert", "right")])
def test_padded_batch_gives_each_example_its_solo_outputs(builder: str, side: str) -> None:
    model = tuners.apply(testing.BUILDERS[builder](seed=0), "prefix_tuning", num_virtual_tokens=3,
                         prefix_projection=True)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 64, (length,), generator=generator) for length in (7, 4, 2)]
    batched = forward(model, **_padded(rows, side)).logits
    mask = _padded(rows, side)["attention_mask"].bool()
    for index, row in enumerate(rows):
        alone = forward(model, input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long)).logits
        got = batched[index][mask[index]] if batched.dim() == 3 else batched[index]
        torch.testing.assert_close(got, alone[0], atol=PADDING_ATOL, rtol=0)


@pytest.mark.parametrize("builder", ["tiny_llama", "tiny_gpt2"])
def test_generation_with_cache_equals_without_and_follows_peft_forward(builder: str, tmp_path) -> None:
    base = testing.BUILDERS[builder](seed=0)
    torch.manual_seed(0)
    model = tuners.apply(copy.deepcopy(base), "prefix_tuning", num_virtual_tokens=4, prefix_projection=True)
    prompt = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.eval().generate(prompt, **options)
        uncached = model.generate(prompt, use_cache=False, **options)
    assert cached.tolist() == uncached.tolist()
    last = forward(model, input_ids=cached).logits[0, -1]
    assert (last - forward(base, input_ids=cached).logits[0, -1]).abs().max() > 1e-2, "the prefix had no effect"
    tuners.save(model, tmp_path, format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    for position in range(5, cached.shape[1]):  # each token is the argmax of PEFT's forward on the ones before
        logits = forward(reference, input_ids=cached[:, :position]).logits[0, -1]
        assert logits.argmax().item() == cached[0, position].item()
    ours = greedy_batch(model, [prompt[0].tolist()], max_new_tokens=6, pad_id=0)  # tunelab's own decoder
    assert ours[0] == cached[0, 5:].tolist()


def test_left_padded_generation_equals_solo_generation() -> None:
    model = tuners.apply(testing.tiny_llama(seed=0), "prefix_tuning", num_virtual_tokens=3).eval()
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 64, (length,), generator=generator) for length in (6, 3)]
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        batched = model.generate(**_padded(rows, "left"), **options)[:, 6:]
        for index, row in enumerate(rows):
            alone = model.generate(row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **options)
            assert batched[index].tolist() == alone[0, len(row):].tolist()


def test_reparameterization_trains_embedding_and_mlp_then_folds_away(tmp_path) -> None:
    model = tuners.apply(testing.tiny_llama(seed=0), "prefix_tuning", num_virtual_tokens=3, prefix_projection=True,
                         encoder_hidden_size=8)
    batch = testing.example_batch(model)
    names = [name for name, _ in tuners.trainable_parameters(model)]
    assert names == ["tunelab_prefix.prefix_embeddings.default", "tunelab_prefix.prefix_mlp.default.0.weight",
                     "tunelab_prefix.prefix_mlp.default.0.bias", "tunelab_prefix.prefix_mlp.default.2.weight",
                     "tunelab_prefix.prefix_mlp.default.2.bias"]
    model.train()
    model(**batch).loss.backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0
               for _, parameter in tuners.trainable_parameters(model))
    before = forward(model, **batch).logits
    assert prefix.fold(model) == ["default"]
    assert tuners.adapters(model)["default"].prefix_projection is False
    assert [name for name, _ in tuners.trainable_parameters(model)] == ["tunelab_prefix.prefix_embeddings.default"]
    torch.testing.assert_close(forward(model, **batch).logits, before, atol=1e-6, rtol=0)
    tuners.save(model, tmp_path)
    fresh = tuners.load(testing.tiny_llama(seed=0), tmp_path)
    torch.testing.assert_close(forward(fresh, **batch).logits, before, atol=1e-6, rtol=0)
