"""P-Tuning v2: deep prompts + a trained linear head, on encoders (BERT) and decoders (Llama), for
sequence classification and token tagging; PEFT interop through ``PREFIX_TUNING`` files.

PEFT 0.21's SEQ_CLS / TOKEN_CLS prefix forward cannot run under transformers 5.2x (``past_key_values``
was renamed ``cache``), so the PEFT reference is PEFT's ``get_prompt`` passed to the model the way
PEFT's ``_prefix_tuning_forward`` does, under the new name, with PEFT's trained head copy in place.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForTokenClassification, LlamaConfig, LlamaForSequenceClassification

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing

peft = pytest.importorskip("peft")

PARITY_ATOL = 1e-5


@torch.no_grad()
def forward(model: torch.nn.Module, **batch):
    model.eval()
    return model(**batch)


def tiny_bert_tagger(seed: int = 0, num_labels: int = 5) -> BertForTokenClassification:
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForTokenClassification(config).eval()


def tiny_llama_classifier(seed: int = 0) -> LlamaForSequenceClassification:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config).eval()


def tagging_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 64, (4, 7), generator=generator)
    labels = torch.randint(0, 5, (4, 7), generator=generator)
    labels[:, 0] = -100  # e.g. [CLS]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def peft_reference_logits(reference, batch: dict) -> torch.Tensor:
    """PEFT's ``_prefix_tuning_forward``: ``get_prompt`` as the cache, ``n`` ones in front of the mask."""
    batch_size = batch["input_ids"].shape[0]
    n = reference.peft_config["default"].num_virtual_tokens
    mask = torch.cat([torch.ones(batch_size, n, dtype=torch.long), batch["attention_mask"]], dim=1)
    with torch.no_grad():
        return reference.get_base_model()(input_ids=batch["input_ids"], attention_mask=mask,
                                          cache=reference.get_prompt(batch_size)).logits


BUILDERS = {"seq-cls": (testing.tiny_bert, testing.example_batch), "token-cls": (tiny_bert_tagger, None)}


@pytest.mark.parametrize("task", list(BUILDERS))
def test_head_trains_and_round_trips_through_peft(task: str, tmp_path) -> None:
    build, make_batch = BUILDERS[task]
    base = build(seed=0)
    batch = make_batch(base) if make_batch else tagging_batch()
    model = tuners.apply(copy.deepcopy(base), "p_tuning_v2", num_virtual_tokens=4, prefix_projection=True,
                         encoder_hidden_size=16)
    assert tuners.adapters(model)["default"].modules_to_save == ["classifier"]
    assert {name for name, _ in tuners.trainable_parameters(model)} == {
        "classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias",
        "tunelab_prefix.prefix_embeddings.default", "tunelab_prefix.prefix_mlp.default.0.weight",
        "tunelab_prefix.prefix_mlp.default.0.bias", "tunelab_prefix.prefix_mlp.default.2.weight",
        "tunelab_prefix.prefix_mlp.default.2.bias"}
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.5)  # a trained head, not the base one
    tuners.save(model, tmp_path / "ours", format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert reference.peft_config["default"].task_type == ("SEQ_CLS" if task == "seq-cls" else "TOKEN_CLS")
    ours, expected = forward(model, **batch).logits, peft_reference_logits(reference, batch)
    assert (expected - forward(base, **batch).logits).abs().max() > 1e-2, "vacuous parity"
    torch.testing.assert_close(ours, expected, atol=PARITY_ATOL, rtol=0)
    reference.save_pretrained(str(tmp_path / "theirs"))
    again = tuners.load(copy.deepcopy(base), tmp_path / "theirs")
    assert tuners.adapters(again)["default"].method == "p_tuning_v2"
    torch.testing.assert_close(forward(again, **batch).logits, expected, atol=PARITY_ATOL, rtol=0)


def test_token_tagging_trains_prompts_and_head() -> None:
    model = tuners.apply(tiny_bert_tagger(seed=0), "p_tuning_v2", num_virtual_tokens=4)
    batch = tagging_batch()
    out = forward(model, **batch)
    assert out.logits.shape == (4, 7, 5)  # one tag distribution per real token
    optimizer = torch.optim.AdamW([p for _, p in tuners.trainable_parameters(model)], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    prefix_grad = model.tunelab_prefix.prefix_embeddings["default"]
    assert prefix_grad.requires_grad and all(not p.requires_grad for n, p in model.named_parameters()
                                             if n.startswith("bert."))


def test_decoder_classifier_finds_the_last_real_token_of_right_padded_rows() -> None:
    model = tuners.apply(tiny_llama_classifier(seed=0), "p_tuning_v2", num_virtual_tokens=3)
    with torch.no_grad():
        model.score.modules_to_save["default"].weight.add_(0.5)
    rows = [torch.tensor([5, 9, 11, 30, 7]), torch.tensor([12, 40])]
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, : len(row)], mask[index, : len(row)] = row, 1
    batched = forward(model, input_ids=ids, attention_mask=mask).logits  # (B, C)
    for index, row in enumerate(rows):
        alone = forward(model, input_ids=row[None]).logits[0]
        torch.testing.assert_close(batched[index], alone, atol=1e-5, rtol=0)
    with tuners.disabled(model):
        assert (forward(model, input_ids=ids, attention_mask=mask).logits - batched).abs().max() > 1e-2


def test_a_model_without_a_head_is_refused() -> None:
    with pytest.raises(MethodError, match="classification head"):
        tuners.apply(testing.tiny_llama(), "p_tuning_v2", num_virtual_tokens=2)
    model = tuners.apply(testing.tiny_llama(), "p_tuning_v2", num_virtual_tokens=2, modules_to_save=["lm_head"])
    assert tuners.adapters(model)["default"].modules_to_save == ["lm_head"]
