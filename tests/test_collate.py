"""Collators: the loss mask lies exactly on the response, truncation keeps the response, NER tags land
on the first sub-token of each word. Tokenizers are tiny BPEs trained here, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tunelab.data import collate, formats, templates
from tunelab.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IGNORE = collate.IGNORE_INDEX
CORPUS = [
    "the cat sat on the mat", "what is the capital of france", "paris is the capital of france",
    "User: Assistant: User: Assistant:", "name a colour. blue is a colour.", "be brief and kind",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes, decoding is exact) with <s>, </s> and optionally <pad>."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if pad else None)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_text(tok, row_ids: torch.Tensor, row_labels: torch.Tensor) -> str:
    return tok.decode(row_ids[row_labels != IGNORE].tolist())


RECORDS = [
    {"id": "a", "prompt": "what is the capital of france", "response": "paris"},
    {"id": "b", "prompt": "name a colour.", "response": "blue is a colour.", "system": "be brief"},
]


def test_sft_labels_mask_exactly_the_prompt_and_padding(tok):
    batch = collate.SFTCollator(tok)(RECORDS)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values()) and batch["input_ids"].shape == batch["labels"].shape
    for row, record in enumerate(RECORDS):
        prompt = [tok.bos_token_id] + ids(tok, templates.render_prompt(record))
        response = ids(tok, record["response"]) + [tok.eos_token_id]
        length = len(prompt) + len(response)
        assert batch["input_ids"][row, :length].tolist() == prompt + response
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["labels"].shape[1] - length)
        labels = batch["labels"][row].tolist()
        assert labels == [IGNORE] * len(prompt) + response + [IGNORE] * (len(labels) - length)
        assert trained_text(tok, batch["input_ids"][row], batch["labels"][row]) == record["response"] + "</s>"
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()


def test_unmasked_prompt_and_eos_fallback_for_padding(tok):
    batch = collate.SFTCollator(tok, mask_prompt=False)(RECORDS)
    real = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][real], batch["input_ids"][real]) and (batch["labels"][~real] == IGNORE).all()
    no_pad = tiny_tokenizer(pad=False)
    assert no_pad.pad_token_id is None
    padded = collate.SFTCollator(no_pad)(RECORDS)
    short = int(padded["attention_mask"].sum(1).argmin())
    pads = padded["attention_mask"][short] == 0
    assert pads.any() and (padded["input_ids"][short][pads] == no_pad.eos_token_id).all()
    assert (padded["labels"][short][pads] == IGNORE).all()
    real_eos = padded["labels"][short][~pads][-1]  # the trained EOS stays a target although pad == eos
    assert real_eos == no_pad.eos_token_id


def test_truncation_cuts_the_prompt_from_the_left(tok):
    record = {"prompt": "the cat sat on the mat " * 20, "response": "paris"}
    batch = collate.SFTCollator(tok, max_length=32)([record])
    prompt = ids(tok, templates.render_prompt(record))
    response = ids(tok, "paris") + [tok.eos_token_id]
    kept = 32 - 1 - len(response)
    assert batch["input_ids"][0].tolist() == [tok.bos_token_id] + prompt[-kept:] + response
    assert batch["labels"][0].tolist() == [IGNORE] * (1 + kept) + response


def test_truncation_cuts_a_long_response_on_the_right(tok):
    record = {"prompt": "name a colour.", "response": "blue is a colour. " * 30}
    prompt = ids(tok, templates.render_prompt(record))
    response = ids(tok, record["response"])
    max_length = 2 * len(prompt) + 1  # budget // 2 == len(prompt): the whole prompt stays
    (row,) = collate.SFTCollator(tok, max_length=max_length)([record])["input_ids"]
    assert row.tolist() == [tok.bos_token_id] + prompt + response[: len(prompt)]  # no EOS: it did not end
    long_prompt = {"prompt": "the cat sat on the mat " * 20, "response": record["response"]}
    encoded, labels = collate.SFTCollator(tok, max_length=40).encode(long_prompt)
    assert len(encoded) == 40 and labels.count(IGNORE) == 1 + 39 // 2  # BOS + half the budget


def test_chat_records_train_every_assistant_turn(tok):
    messages = [{"role": "user", "content": "what is the capital of france"},
                {"role": "assistant", "content": "paris"},
                {"role": "user", "content": "name a colour."},
                {"role": "assistant", "content": "blue"}]
    record = {"kind": "chat", "messages": messages, "prompt": "...", "response": "blue"}
    for template, ends in (("plain", ["paris", "blue</s>"]), ("chatml", ["paris<|im_end|>", "blue<|im_end|></s>"])):
        batch = collate.SFTCollator(tok, template=template)([record])
        labels, row = batch["labels"][0], batch["input_ids"][0]
        trained = (labels != IGNORE).int().tolist()
        runs, start = [], None  # contiguous trained spans
        for i, flag in enumerate(trained + [0]):
            if flag and start is None:
                start = i
            if not flag and start is not None:
                runs.append(tok.decode(row[start:i].tolist()))
                start = None
        assert runs == ends
        assert tok.decode(row.tolist()) == "<s>" + templates.render_chat(messages, template) + "</s>"


def test_auto_template_uses_the_tokenizer_chat_template(tok):
    chat_tok = tiny_tokenizer()
    chat_tok.chat_template = CHATML
    record = {"prompt": "what is the capital of france", "response": "paris", "system": "be brief"}
    assert templates.render_prompt(record, "auto", chat_tok) == templates.render_prompt(record, "chatml")
    auto = collate.SFTCollator(chat_tok, template="auto")([record])
    trained = auto["input_ids"][0][auto["labels"][0] != IGNORE].tolist()
    assert chat_tok.decode(trained) == "paris<|im_end|>\n</s>"  # the template's own turn end is trained
    chat_tok.chat_template = "{{ bos_token }}" + CHATML  # templates that write BOS get exactly one
    with_bos = collate.SFTCollator(chat_tok, template="auto")([record])["input_ids"][0].tolist()
    assert with_bos[0] == chat_tok.bos_token_id and with_bos.count(chat_tok.bos_token_id) == 1
    assert with_bos == auto["input_ids"][0].tolist()
    plain = collate.SFTCollator(tok, template="auto")([record])  # no chat template: plain
    assert torch.equal(plain["input_ids"], collate.SFTCollator(tok)([record])["input_ids"])


def test_classification_collator(tok):
    records = [{"text": "the cat sat", "label": "neg"}, {"text": "paris is the capital of france", "label": "pos"}]
    batch = collate.ClassificationCollator(tok, ["neg", "pos"])(records)
    assert batch["labels"].tolist() == [0, 1] and batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == len(tok("the cat sat")["input_ids"])
    with pytest.raises(DataError, match=r"unknown label 'meh'.*\['neg', 'pos'\]"):
        collate.ClassificationCollator(tok, ["neg", "pos"])([{"id": "x", "text": "a", "label": "meh"}])


def test_token_classification_labels_the_first_sub_token(tok):
    names = ["O", "B-LOC", "I-LOC", "B-PER"]
    record = {"tokens": ["Zxqwv", "lives", "in", "paris"], "ner_tags": ["B-PER", "O", "O", "B-LOC"]}
    batch = collate.TokenClassificationCollator(tok, names)([record, {"tokens": ["cat"], "ner_tags": ["O"]}])
    encoded = tok(record["tokens"], is_split_into_words=True)
    word_ids = encoded.word_ids()
    assert word_ids.count(0) > 1  # the rare word is split: alignment matters
    labels = batch["labels"][0, : len(word_ids)].tolist()
    expected = [names.index(record["ner_tags"][w]) if w is not None and (i == 0 or word_ids[i - 1] != w) else IGNORE
                for i, w in enumerate(word_ids)]
    assert labels == expected and sum(label != IGNORE for label in labels) == 4
    assert (batch["labels"][1, len(tok(["cat"], is_split_into_words=True)["input_ids"]) :] == IGNORE).all()
    with pytest.raises(DataError, match="unknown tag"):
        collate.TokenClassificationCollator(tok, names)([{"tokens": ["a"], "ner_tags": ["B-ORG"]}])


def test_preference_collator_masks_the_prompt_and_history(tok):
    record = {"kind": "preference", "prompt": "...", "chosen": "paris", "rejected": "blue is a colour.",
              "messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"},
                           {"role": "user", "content": "what is the capital of france"}]}
    batch = collate.PreferenceCollator(tok)([record])
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    for side in ("chosen", "rejected"):
        text = trained_text(tok, batch[f"{side}_input_ids"][0], batch[f"{side}_labels"][0])
        assert text == record[side] + "</s>"  # the earlier assistant turn "sat" is context only
    prompt_length = 1 + len(ids(tok, templates.render_prompt(record)))
    assert torch.equal(batch["chosen_input_ids"][0, :prompt_length], batch["rejected_input_ids"][0, :prompt_length])
    with pytest.raises(DataError, match="PreferenceCollator"):
        collate.SFTCollator(tok)([record])


def test_collators_on_real_samples(tok):
    def sample(relative: str, **kwargs) -> list[dict]:
        if not (DATA / relative).exists():
            pytest.skip(f"shared data sample {relative} not available")
        return formats.load_records(DATA / relative, **kwargs)

    alpaca = sample("instruction/llamafactory_alpaca_en_demo.json", limit=16)
    batch = collate.SFTCollator(tok, max_length=256)(alpaca)
    assert batch["input_ids"].shape[1] <= 256 and ((batch["labels"] != IGNORE).sum(1) > 0).all()
    chats = sample("instruction/oasst_en_100_tree.jsonl", limit=8)
    assert ((collate.SFTCollator(tok, template="chatml")(chats)["labels"] != IGNORE).sum(1) > 0).all()
    pairs = sample("preference/hh_rlhf_harmless_base_test.jsonl.gz", limit=8)
    batch = collate.PreferenceCollator(tok, template="none")(pairs)
    for row, pair in enumerate(pairs):  # the whole reply + EOS, or a right-cut reply filling max_length
        chosen = trained_text(tok, batch["chosen_input_ids"][row], batch["chosen_labels"][row])
        full = batch["chosen_attention_mask"][row].sum() == 256
        assert chosen == pair["chosen"] + "</s>" or (full and pair["chosen"].startswith(chosen) and chosen)
