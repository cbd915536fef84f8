"""Prompt tuning: parity with HF PEFT both ways, the three initialisations, alignment, padding, generation.

The matrix (test_tuner_matrix.py) covers save/load, disable, unload and training. References are
PEFT 0.21's own forward passes on a deep copy of the same seeded tiny model; PEFT returns logits for
the virtual positions too, tunelab strips them, so ours are compared with ``peft_logits[:, n:]``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity_helpers import PARITY_ATOL, assert_parity
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.eval.generate import greedy_batch
from tunelab.models import testing

peft = pytest.importorskip("peft")

N = 3  # virtual tokens in most cases


@torch.no_grad()
def forward(model: torch.nn.Module, **batch):
    model.eval()
    return model(**batch)


def strip(logits: torch.Tensor, n: int) -> torch.Tensor:
    return logits[:, n:] if logits.dim() == 3 else logits


CASES = {
    "llama": ("tiny_llama", dict(num_virtual_tokens=N)),
    "gpt2": ("tiny_gpt2", dict(num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB")),
    "bert-head": ("tiny_bert", dict(num_virtual_tokens=N, modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_our_prompt_and_we_load_it_back(case: str, tmp_path) -> None:
    builder, options = CASES[case]
    base = testing.BUILDERS[builder](seed=0)
    batch = testing.example_batch(base)
    model = tuners.apply(copy.deepcopy(base), "prompt_tuning", **options)
    tuners.save(model, tmp_path, format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    ours, theirs = forward(model, **batch), forward(reference, **batch)
    base_logits = forward(base, **batch).logits
    assert ours.logits.shape == base_logits.shape  # virtual positions stripped
    assert_parity(ours.logits, strip(theirs.logits, N), base_logits)
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), abs=PARITY_ATOL)
    again = tuners.load(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(forward(again, **batch).logits, ours.logits, atol=PARITY_ATOL, rtol=0)


def test_we_load_a_peft_trained_prompt(tmp_path) -> None:
    base = testing.tiny_llama(seed=0)
    batch = testing.example_batch(base)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                 num_virtual_tokens=5))
    reference.save_pretrained(str(tmp_path))
    ours = tuners.load(copy.deepcopy(base), tmp_path)
    assert tuners.adapters(ours)["default"].num_virtual_tokens == 5
    assert_parity(forward(ours, **batch).logits, strip(forward(reference, **batch).logits, 5),
                  forward(base, **batch).logits)


def word_tokenizer(directory) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' 64 ids, saved to ``directory`` (PEFT loads it by path)."""
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3} | {f"w{i}": i for i in range(4, 64)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def test_text_init_matches_peft_and_loads_without_the_tokenizer(tmp_path) -> None:
    tokenizer = word_tokenizer(tmp_path / "tok")
    text = "w5 w9 w17"  # 3 tokens, repeated to 7 virtual tokens: w5 w9 w17 w5 w9 w17 w5
    base = testing.tiny_llama(seed=0)
    ours = tuners.apply(copy.deepcopy(base), "prompt_tuning", num_virtual_tokens=7, prompt_tuning_init="TEXT",
                        prompt_tuning_init_text=text, tokenizer=tokenizer)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path / "tok")))
    expected = reference.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(ours.tunelab_prompt.prompt_embeddings["default"], expected, atol=0, rtol=0)
    torch.testing.assert_close(expected[3], base.model.embed_tokens.weight[5], atol=0, rtol=0)
    config = tuners.adapters(ours)["default"]
    assert config.prompt_tuning_init_token_ids == [5, 9, 17] and "tokenizer" not in config.options()
    tuners.save(ours, tmp_path / "saved")
    tuners.load(copy.deepcopy(base), tmp_path / "saved")  # no tokenizer needed any more


def test_random_and_vocabulary_initialisations() -> None:
    model = tuners.apply(testing.tiny_llama(seed=0), "prompt_tuning", num_virtual_tokens=50)
    prompt = model.tunelab_prompt.prompt_embeddings["default"]
    assert prompt.abs().max() <= 0.5 and prompt.std() > 0.2  # Lester et al.: uniform in [-0.5, 0.5]
    tuners.apply(model, "prompt_tuning", num_virtual_tokens=8, prompt_tuning_init="SAMPLE_VOCAB", adapter_name="v")
    vocabulary = model.model.embed_tokens.weight
    for row in model.tunelab_prompt.prompt_embeddings["v"]:
        assert (vocabulary - row).abs().amax(dim=1).min() == 0  # every row is some token's embedding


def test_token_classification_outputs_and_labels_line_up() -> None:
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64, num_labels=5, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = tuners.apply(BertForTokenClassification(config), "prompt_tuning", num_virtual_tokens=4,
                         modules_to_save=["classifier"])
    input_ids = torch.randint(3, 64, (2, 6))
    labels = torch.randint(0, 5, (2, 6))
    labels[:, 0] = -100
    out = forward(model, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    assert out.logits.shape == (2, 6, 5)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1), ignore_index=-100)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_each_example_its_solo_outputs(side: str) -> None:
    model = tuners.apply(testing.tiny_llama(seed=0), "prompt_tuning", num_virtual_tokens=N)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 64, (length,), generator=generator) for length in (6, 2)]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        span = slice(6 - len(row), 6) if side == "left" else slice(0, len(row))
        ids[index, span], mask[index, span] = row, 1
    batched = forward(model, input_ids=ids, attention_mask=mask).logits
    for index, row in enumerate(rows):
        alone = forward(model, input_ids=row[None]).logits[0]
        torch.testing.assert_close(batched[index][mask[index].bool()], alone, atol=1e-5, rtol=0)


def assert_follows_reference_forward(reference, sequence: torch.Tensor, prompt_length: int) -> None:
    """Each generated token is the argmax of the reference's *forward* logits on the tokens before it.

    PEFT 0.21's own ``generate`` is no reference under transformers 5.2x: its cached decoding drifts
    from its forward pass after a few tokens (and drops prefixes entirely), while its forward is exact.
    """
    for position in range(prompt_length, sequence.shape[1]):
        logits = forward(reference, input_ids=sequence[:, :position]).logits[0, -1]
        assert logits.argmax().item() == sequence[0, position].item()


@pytest.mark.parametrize("builder", ["tiny_llama", "tiny_gpt2"])
def test_generation_with_cache_equals_without_and_follows_peft(builder: str, tmp_path) -> None:
    base = testing.BUILDERS[builder](seed=0)
    torch.manual_seed(0)
    model = tuners.apply(copy.deepcopy(base), "prompt_tuning", num_virtual_tokens=4).eval()
    prompt = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(prompt, **options)
        uncached = model.generate(prompt, use_cache=False, **options)
    assert cached.tolist() == uncached.tolist()
    last = forward(model, input_ids=cached).logits[0, -1]
    assert (last - forward(base, input_ids=cached).logits[0, -1]).abs().max() > 1e-2, "the prompt had no effect"
    tuners.save(model, tmp_path, format="peft")
    assert_follows_reference_forward(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)), cached, 5)
    assert greedy_batch(model, [prompt[0].tolist()], max_new_tokens=6, pad_id=0)[0] == cached[0, 5:].tolist()


def test_user_mistakes_raise_one_line_method_errors() -> None:
    with pytest.raises(MethodError, match="transformers model with input embeddings"):
        tuners.apply(testing.toy_mlp(), "prompt_tuning", num_virtual_tokens=2)
    with pytest.raises(MethodError, match="prompt_tuning_init_text"):
        tuners.apply(testing.tiny_llama(), "prompt_tuning", prompt_tuning_init="TEXT")
    with pytest.raises(MethodError, match="num_virtual_tokens"):
        tuners.apply(testing.tiny_llama(), "prompt_tuning", num_virtual_tokens=0)
    with pytest.raises(MethodError, match="leave no room"):
        tuners.apply(testing.tiny_llama(), "prompt_tuning", num_virtual_tokens=64)(**testing.example_batch(
            testing.tiny_llama()))
