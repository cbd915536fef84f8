"""Named task heads: each kind against a hand computation, pooling, per-row routing, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tunelab.errors import ConfigError, ModelError, TunelabError
from tunelab.models.heads import (
    HEAD_KINDS,
    HEADS_CONFIG,
    HEADS_WEIGHTS,
    TaskHeads,
    best_spans,
    load_heads,
    save_heads,
)
from tunelab.models.testing import tiny_bert, tiny_llama

LENGTHS = [8, 5, 3, 6, 8]  # real tokens per row; the rest is right padding


def padded_batch(lengths=LENGTHS, seq_len=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 64, (len(lengths), seq_len), generator=generator)  # (B, T)
    attention_mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}


def last_hidden(model, batch):
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[-1]  # (B, T, H)


def all_heads(model):
    torch.manual_seed(0)
    heads = TaskHeads.for_model(model)
    heads.add_head("domain", "classification", label_names=["general", "medical", "legal"])
    heads.add_head("ner", "token_classification", num_labels=5)
    heads.add_head("qa", "span_qa")
    heads.add_head("gen", "lm")
    heads.add_head("reward", "scalar")
    return heads


def test_classification_pools_last_real_token_of_right_padded_decoder():
    model = tiny_llama()
    heads = all_heads(model)
    assert heads.specs["domain"].pooling == "last"
    batch = padded_batch()
    batch["labels"] = torch.tensor([0, 2, 1, -100, 2])
    out = heads(model, batch, task="domain")
    hidden = last_hidden(model, batch)
    pooled = hidden[torch.arange(5), torch.tensor(LENGTHS) - 1]  # (B, H): the last real token
    expected = heads.heads["domain"].proj(pooled)  # (B, 3)
    torch.testing.assert_close(out.logits, expected)
    kept = batch["labels"] != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(expected[kept], batch["labels"][kept]))
    # the same as the row alone, unpadded
    alone = heads(model, {key: value[2:3, :3] for key, value in batch.items() if key != "labels"}, task="domain")
    torch.testing.assert_close(out.logits[2:3], alone.logits, atol=1e-5, rtol=1e-5)


def test_left_padding_pools_the_last_position():
    model = tiny_llama()
    heads = all_heads(model)
    batch = padded_batch([3, 8])
    flipped = {key: value.flip(1) for key, value in batch.items()}  # left padded
    hidden = last_hidden(model, flipped)
    out = heads(model, flipped, task="domain")
    torch.testing.assert_close(out.logits, heads.heads["domain"].proj(hidden[:, -1]))


def test_encoder_pools_the_first_token_and_mean_pooling_is_masked():
    model = tiny_bert()
    heads = TaskHeads.for_model(model)
    assert heads.decoder is False
    heads.add_head("cls", "classification", num_labels=2)
    heads.add_head("mean", "classification", num_labels=2, pooling="mean")
    batch = padded_batch()
    hidden = last_hidden(model, batch)
    torch.testing.assert_close(heads(model, batch, task="cls").logits, heads.heads["cls"].proj(hidden[:, 0]))
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(heads(model, batch, task="mean").logits, heads.heads["mean"].proj(mean))


def test_token_classification_loss_is_cross_entropy_over_labelled_tokens():
    model = tiny_llama()
    heads = all_heads(model)
    batch = padded_batch()
    labels = torch.randint(0, 5, (5, 8), generator=torch.Generator().manual_seed(1))
    batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
    out = heads(model, batch, task="ner")
    assert out.logits.shape == (5, 8, 5)
    torch.testing.assert_close(out.logits, heads.heads["ner"].proj(last_hidden(model, batch)))
    terms = [-out.logits[b, t].log_softmax(-1)[batch["labels"][b, t]]
             for b in range(5) for t in range(8) if batch["labels"][b, t] != -100]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())


def test_span_qa_loss_and_hf_position_keys():
    model = tiny_llama()
    heads = all_heads(model)
    batch = padded_batch()
    spans = torch.tensor([[1, 3], [0, 0], [2, 2], [1, 4], [5, 7]])
    out = heads(model, {**batch, "labels": spans}, task="qa")
    assert out.logits.shape == (5, 8, 2)
    start = F.cross_entropy(out.logits[..., 0], spans[:, 0])
    end = F.cross_entropy(out.logits[..., 1], spans[:, 1])
    torch.testing.assert_close(out.loss, (start + end) / 2)
    hf_keys = heads(model, {**batch, "start_positions": spans[:, 0], "end_positions": spans[:, 1]}, task="qa")
    torch.testing.assert_close(hf_keys.loss, out.loss)


def test_best_spans_respects_order_max_length_and_mask():
    logits = torch.full((2, 6, 2), -5.0)
    logits[0, 1, 0], logits[0, 4, 1] = 3.0, 2.0  # best span 1..4 (length 4)
    logits[0, 0, 1] = 9.0  # an end before every good start: not allowed
    logits[1, 0, 0], logits[1, 5, 1] = 9.0, 9.0  # 0..5 has length 6
    start, end, score = best_spans(logits, max_answer_length=4)
    assert (start[0].item(), end[0].item(), score[0].item()) == (1, 4, 5.0)
    assert end[1] - start[1] < 4
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    start, end, _ = best_spans(logits, max_answer_length=6, mask=mask)
    assert start[0] >= 2 and end[0] == 4
    assert (start[1].item(), end[1].item()) == (0, 5)


def test_lm_head_returns_the_model_logits_and_its_loss():
    model = tiny_llama()
    heads = all_heads(model)
    batch = padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = heads(model, {**batch, "labels": labels}, task="gen")
    with torch.no_grad():
        reference = model(**batch, labels=labels)
    torch.testing.assert_close(out.logits, reference.logits)
    torch.testing.assert_close(out.loss, reference.loss)
    assert list(heads.heads["gen"].parameters()) == []


def test_lm_head_on_a_masked_lm_encoder_does_not_shift():
    from transformers import BertForMaskedLM

    model = BertForMaskedLM(tiny_bert().config).eval()
    heads = TaskHeads.for_model(model)
    heads.add_head("mlm", "lm")
    batch = padded_batch()
    labels = batch["input_ids"].masked_fill(torch.arange(8) % 2 == 0, -100)
    with torch.no_grad():
        reference = model(**batch, labels=labels).loss
    torch.testing.assert_close(heads(model, {**batch, "labels": labels}).loss, reference)


def test_prompt_tuning_virtual_tokens_are_cut_from_the_hidden_states():
    from tunelab import tuners

    model = tuners.apply(tiny_llama(), "prompt_tuning", num_virtual_tokens=3)
    heads = all_heads(model)
    batch = padded_batch()
    assert heads(model, batch, task="ner").logits.shape == (5, 8, 5)
    assert heads(model, batch, task="gen").logits.shape == (5, 8, 64)
    assert heads(model, batch, task="domain").logits.shape == (5, 3)


def test_lm_head_on_a_backbone_without_lm_head_fails_in_one_line():
    model = tiny_bert()
    heads = TaskHeads.for_model(model)
    heads.add_head("gen", "lm")
    with pytest.raises(ModelError, match="LM head") as error:
        heads(model, padded_batch(), task="gen")
    assert "\n" not in str(error.value)


def test_scalar_head_pooled_and_per_token():
    model = tiny_llama()
    heads = all_heads(model)
    heads.add_head("value", "scalar", pooling="none")
    batch = padded_batch()
    targets = torch.linspace(-1, 1, 5)
    out = heads(model, {**batch, "labels": targets}, task="reward")
    assert out.logits.shape == (5,)
    torch.testing.assert_close(out.loss, ((out.logits - targets) ** 2).mean())
    per_token = heads(model, {**batch, "labels": torch.ones(5, 8)}, task="value")
    assert per_token.logits.shape == (5, 8)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(per_token.loss, ((per_token.logits[real] - 1) ** 2).mean())


def test_mixed_task_batch_equals_each_row_alone_and_runs_each_head_once():
    model = tiny_llama()
    heads = all_heads(model)
    calls = {name: 0 for name in heads.heads}
    for name, head in heads.heads.items():
        head.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    batch = padded_batch()
    tasks = ["ner", "domain", "qa", "domain", "gen"]
    out = heads(model, batch, task=tasks)
    assert calls == {"domain": 1, "ner": 1, "qa": 1, "gen": 1, "reward": 0}
    assert out.rows["domain"].tolist() == [1, 3]
    for row, (task, length) in enumerate(zip(tasks, LENGTHS, strict=True)):
        alone = heads(model, {key: value[row:row + 1, :length] for key, value in batch.items()}, task=task)
        mixed = out.per_row()[row]
        if mixed.dim() >= 2:  # per-token kinds: the row's real positions
            mixed = mixed[:length]
        torch.testing.assert_close(mixed, alone.logits[0], atol=1e-5, rtol=1e-5)


def test_the_lm_head_runs_only_on_the_rows_of_lm_tasks():
    """The vocabulary logits are computed for generation rows alone (several lm tasks, interleaved), and
    each row's logits and the per-task losses equal the whole-batch computation's."""
    model = tiny_llama()
    heads = all_heads(model)
    heads.add_head("gen2", "lm")
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    batch = padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    tasks = ["gen2", "ner", "gen", "domain", "gen2"]
    out = heads(model, {**batch, "labels": {"gen": labels[[2]], "gen2": labels[[0, 4]]}}, task=tasks)
    assert seen == [3]  # rows 0, 4 (gen2) and 2 (gen), not 5
    with torch.no_grad():
        full = model(**batch).logits  # (5, T, V)
    torch.testing.assert_close(out.logits["gen2"], full[[0, 4]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits["gen"], full[[2]], atol=1e-5, rtol=1e-5)
    shifted = F.cross_entropy(full[[0, 4], :-1].flatten(0, 1), labels[[0, 4], 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.losses["gen2"], shifted, atol=1e-5, rtol=1e-5)
    seen.clear()
    heads(model, batch, task="ner")  # no lm row: no vocabulary logits at all
    assert seen == [0]
    seen.clear()
    heads(model, batch, task="gen")
    assert seen == [5]


def test_an_adapter_wrapped_lm_head_still_computes_every_row():
    from tunelab import tuners

    model = tuners.apply(tiny_llama(), "lora", r=2, target_modules=["lm_head", "q_proj"])
    heads = all_heads(model)
    batch = padded_batch()
    out = heads(model, batch, task=["gen", "ner", "gen", "domain", "qa"])
    with torch.no_grad():
        full = model(**batch).logits
    torch.testing.assert_close(out.logits["gen"], full[[0, 2]], atol=1e-5, rtol=1e-5)


def test_mixed_task_loss_takes_labels_per_task_or_per_row():
    model = tiny_llama()
    heads = all_heads(model)
    batch = padded_batch([8, 6, 8])
    tasks = ["domain", "ner", "domain"]
    token_labels = torch.tensor([[0, 1, 2, 3, 4, 0, -100, -100]])
    by_task = heads(model, {**batch, "labels": {"domain": torch.tensor([2, 0]), "ner": token_labels}}, task=tasks)
    by_row = heads(model, {**batch, "labels": [torch.tensor(2), token_labels[0], torch.tensor(0)]}, task=tasks)
    domain = heads(model, {key: value[[0, 2]] for key, value in batch.items()}, task="domain")
    expected_domain = F.cross_entropy(domain.logits, torch.tensor([2, 0]))
    torch.testing.assert_close(by_task.losses["domain"], expected_domain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_task.loss, (2 * by_task.losses["domain"] + by_task.losses["ner"]) / 3)
    torch.testing.assert_close(by_row.loss, by_task.loss)


def test_active_head_and_switching():
    model = tiny_llama()
    heads = all_heads(model)
    batch = padded_batch()
    assert heads.active_head == "domain"  # the first head added
    with heads.using_head("ner"):
        assert heads(model, batch).logits.shape == (5, 8, 5)
    assert heads.active_head == "domain"
    heads.set_active_head("qa")
    assert heads(model, batch).logits.shape == (5, 8, 2)
    with pytest.raises(ConfigError, match="unknown head 'nope'"):
        heads.set_active_head("nope")
    with pytest.raises(ConfigError, match="one per row"):
        heads(model, batch, task=["domain"])


@pytest.mark.parametrize("kind, options, message", [
    ("sentiment", {}, "unknown head kind"),
    ("classification", {}, "num_labels"),
    ("classification", {"num_labels": 2, "label_names": ["a"]}, "label_names"),
    ("span_qa", {"num_labels": 3}, "2 outputs"),
    ("classification", {"num_labels": 2, "pooling": "none"}, "pooling"),
])
def test_add_head_rejects_bad_options(kind, options, message):
    heads = TaskHeads.for_model(tiny_llama())
    with pytest.raises(ConfigError, match=message):
        heads.add_head("task", kind, **options)
    heads.add_head("task", "lm")
    with pytest.raises(ConfigError, match="exists already"):
        heads.add_head("task", "lm")


def test_heads_train_and_their_parameters_reach_the_optimizer():
    model = tiny_llama()
    heads = all_heads(model)
    parameters = list(heads.parameters())
    assert len(parameters) == 2 * 4 and all(parameter.requires_grad for parameter in parameters)  # 4 Linear heads
    batch = {**padded_batch(), "labels": torch.tensor([0, 1, 2, 0, 1])}
    optimizer = torch.optim.SGD(heads.parameters(), lr=0.5)
    before = heads(model, batch, task="domain").loss
    before.backward()
    assert heads.heads["domain"].proj.weight.grad.abs().sum() > 0
    optimizer.step()
    assert heads(model, batch, task="domain").loss < before


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_llama()
    heads = all_heads(model)
    heads.set_active_head("ner")
    save_heads(heads, tmp_path)
    record = json.loads((tmp_path / HEADS_CONFIG).read_text())
    assert record["heads"]["domain"]["label_names"] == ["general", "medical", "legal"]
    assert {spec["kind"] for spec in record["heads"].values()} == set(HEAD_KINDS)
    loaded = load_heads(model, tmp_path)
    assert loaded.specs == heads.specs and loaded.active_head == "ner"
    batch = padded_batch()
    for name in heads.heads:
        assert torch.equal(loaded(model, batch, task=name).logits, heads(model, batch, task=name).logits)
    # into existing heads: the saved ones are added, existing ones overwritten
    partial = TaskHeads.for_model(model)
    partial.add_head("ner", "token_classification", num_labels=5)
    load_heads(partial, tmp_path)
    assert set(partial.heads) == set(heads.heads)
    assert torch.equal(partial(model, batch, task="ner").logits, heads(model, batch, task="ner").logits)


def test_heads_live_beside_the_adapter(tmp_path):
    from tunelab import tuners

    model = tuners.apply(tiny_llama(), "lora", r=2, target_modules=["q_proj", "v_proj"])
    heads = all_heads(model)
    tuners.save(model, tmp_path)
    save_heads(heads, tmp_path)
    assert (tmp_path / HEADS_WEIGHTS).is_file()
    restored = tuners.load(tiny_llama(), tmp_path)
    loaded = load_heads(restored, tmp_path)
    batch = padded_batch()
    torch.testing.assert_close(loaded(restored, batch, task="domain").logits, heads(model, batch, task="domain").logits)


def test_load_errors_are_one_line(tmp_path):
    model = tiny_llama()
    with pytest.raises(ModelError, match="no heads.json"):
        load_heads(model, tmp_path)
    heads = TaskHeads.for_model(model)
    heads.add_head("ner", "token_classification", num_labels=5)
    save_heads(heads, tmp_path)
    other = TaskHeads.for_model(model)
    other.add_head("ner", "token_classification", num_labels=7)
    with pytest.raises(TunelabError, match="ner") as error:
        load_heads(other, tmp_path)
    assert "\n" not in str(error.value)
