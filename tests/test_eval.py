"""Tests for tunelab.eval: metrics against hand-computed values, KV-cached batched greedy decoding
against a no-cache reference loop on tiny random Llama / GPT-2 models, and task-level scoring."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tunelab.eval import generate, metrics, tasks
from tunelab.eval.generate import greedy

# ------------------------------------------------------------------------------------------- metrics


def test_normalize_answer_follows_squad():
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.normalize_answer("  An apple, a PEAR and the plum. ") == "apple pear and plum"


def test_exact_match_normalises_and_takes_max_over_references():
    assert metrics.exact_match(["The Cat.", "dog"], ["cat", "a cat"]) == 0.5
    # SQuAD dev example 56be4db0acb8001400a502ec: three gold answers, any one counts.
    assert metrics.exact_match(["Denver Broncos"], [["Denver Broncos", "Denver Broncos", "Broncos"]]) == 1.0


def test_token_f1_hand_values():
    assert metrics.token_f1(["the Denver Broncos"], ["Denver Broncos"]) == 1.0  # article dropped
    assert metrics.token_f1(["Broncos"], ["Denver Broncos"]) == pytest.approx(2 / 3)  # P=1, R=1/2
    assert metrics.token_f1(["Denver Broncos won"], ["Denver Broncos"]) == pytest.approx(0.8)  # P=2/3, R=1
    # multiset overlap: y appears twice in both -> 2 common; P=2/4, R=2/3 -> F1=4/7
    assert metrics.token_f1(["x y y z"], ["y y y"]) == pytest.approx(4 / 7)
    assert metrics.token_f1(["blue"], [["red", "blue sky"]]) == pytest.approx(2 / 3)  # max over refs
    assert metrics.token_f1(["", "x"], ["", "y"]) == 0.5  # empty vs empty = 1, disjoint = 0


def test_rouge_l_hand_values():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 tokens of 6 -> P = R = F = 5/6
    assert metrics.rouge_l(["the cat sat on the mat"], ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    assert metrics.rouge_l(["Hello, World!"], ["hello world"]) == 1.0  # punctuation and case ignored
    assert metrics.rouge_l(["日本"], ["日本"]) == 0.0  # default tokenizer drops non-[a-z0-9] characters
    assert metrics.rouge_l(["a b", "c"], [["x", "a b"], "d"]) == 0.5


def test_accuracy():
    assert metrics.accuracy(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    assert metrics.accuracy([1, 2], [1, 2]) == 1.0


def test_span_f1_character_overlap():
    assert metrics.span_f1([(0, 10)], [(5, 15)]) == 0.5  # overlap 5: P = R = 1/2
    assert metrics.span_f1([(0, 4)], [[(10, 12), (2, 6)]]) == 0.5  # best ref (2, 6): overlap 2
    assert metrics.span_f1([(0, 4), (3, 3)], [(0, 8), (7, 7)]) == pytest.approx((2 / 3 + 1) / 2)
    assert metrics.span_f1([(0, 4)], [(4, 9)]) == 0.0
    assert metrics.span_text_f1(["Denver Broncos won"], [["Denver Broncos"]]) == pytest.approx(0.8)


def test_entity_f1_seqeval_strict_iob2():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    preds = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    # ref entities PER, LOC, ORG; pred PER, ORG (wrong type), ORG -> TP = 2, P = R = 2/3
    assert metrics.entity_f1(preds, refs) == pytest.approx(2 / 3)
    # strict IOB2: an I- tag with no B- starts no entity -> pred {LOC}, ref {PER, LOC}: P=1, R=1/2
    assert metrics.entity_f1([["I-PER", "I-PER", "O", "B-LOC"]], [refs[0]]) == pytest.approx(2 / 3)
    # boundaries must match exactly
    assert metrics.entity_f1([["B-PER", "O", "O", "B-LOC"]], [refs[0]]) == pytest.approx(0.5)
    assert metrics.entity_f1([["O", "O"]], [["O", "O"]]) == 1.0  # nothing to find, nothing found
    with pytest.raises(ValueError):
        metrics.entity_f1([["O"]], [["O", "O"]])


def test_entity_set_f1_micro():
    preds = [{("Zelvorin", "DRUG")}, {("migraine", "CONDITION"), ("x", "DRUG")}]
    refs = [{("Zelvorin", "DRUG")}, {("migraine", "CONDITION")}]
    assert metrics.entity_set_f1(preds, refs) == pytest.approx(0.8)  # TP=2, P=2/3, R=1
    assert metrics.entity_set_f1([set()], [set()]) == 1.0
    assert metrics.entity_set_f1([set()], [{("a", "B")}]) == 0.0


@pytest.mark.parametrize(
    "metric", [metrics.exact_match, metrics.token_f1, metrics.rouge_l, metrics.accuracy, metrics.span_f1]
)
def test_metrics_reject_mismatched_and_empty_inputs(metric):
    example = (0, 1) if metric is metrics.span_f1 else "a"
    with pytest.raises(ValueError, match="predictions but"):
        metric([example, example], [example])
    with pytest.raises(ValueError, match="no examples"):
        metric([], [])


# ---------------------------------------------------------------------------------------- perplexity


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: per-token NLLs are computable by hand."""

    def __init__(self, vocab_size: int = 7):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab_size, vocab_size, generator=generator))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def _hand_nll(model: BigramLM, batch) -> tuple[float, int]:
    log_probs = torch.log_softmax(model.table.detach(), dim=-1)
    total, count = 0.0, 0
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        for t in range(1, len(ids)):
            if labels[t] != -100:
                total -= log_probs[ids[t - 1], labels[t]].item()
                count += 1
    return total, count


def test_perplexity_is_token_weighted_over_batches():
    model = BigramLM()
    long_batch = {  # one row, 5 scored targets
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 6]]),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
        "labels": torch.tensor([[1, 2, 3, 4, 5, 6]]),
    }
    short_batch = {  # right padding (pad id 0) and a masked prompt token: 2 scored targets
        "input_ids": torch.tensor([[3, 1, 4, 0], [2, 5, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 4, -100], [2, 5, -100, -100]]),
    }
    (nll_a, n_a), (nll_b, n_b) = _hand_nll(model, long_batch), _hand_nll(model, short_batch)
    assert (n_a, n_b) == (5, 2)
    expected = math.exp((nll_a + nll_b) / (n_a + n_b))
    batch_averaged = math.exp((nll_a / n_a + nll_b / n_b) / 2)
    assert abs(expected - batch_averaged) > 1e-3  # the two definitions really differ here
    assert metrics.perplexity(model, [long_batch, short_batch]) == pytest.approx(expected, rel=1e-6)
    # without labels every attended token is scored
    no_labels = {k: v for k, v in short_batch.items() if k != "labels"}
    nll, n = _hand_nll(
        model,
        {**no_labels, "labels": short_batch["input_ids"].masked_fill(no_labels["attention_mask"] == 0, -100)},
    )
    assert metrics.perplexity(model, [no_labels]) == pytest.approx(math.exp(nll / n), rel=1e-6)
    with pytest.raises(ValueError, match="no scored tokens"):
        metrics.perplexity(model, [{**long_batch, "labels": torch.full((1, 6), -100)}])


# ------------------------------------------------------------------------------------ greedy decoding

CORPUS = [
    "the patient took zelvorin for a migraine and felt better",
    "the court ruled on the contract dispute between the parties",
    "install the package and run the tests before you deploy",
    "what is the capital of france ? the capital is paris",
]
PROMPTS = [
    "the patient took",
    "install the package and run the tests before you deploy the",
    "what",
    "the court ruled on the contract",
]
N_NEW = 10


@pytest.fixture(scope="module")
def tokenizer():
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _tiny_llama(vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2,  # larger than default so random greedy outputs vary from step to step
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _tiny_gpt2(vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


# Both architectures matter: Llama's rotary embeddings are relative, so a constant position offset per
# row is (nearly) invisible to it, while GPT-2's learned absolute positions catch wrong position_ids.
@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tokenizer):
    build = _tiny_llama if request.param == "llama" else _tiny_gpt2
    return build(len(tokenizer))


def reference_greedy(model, tokenizer, prompt: str, n_new: int) -> list[int]:
    """The textbook loop: re-run the whole sequence every step, no cache, no padding, no early stop."""
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)[
        "input_ids"
    ]  # as in training
    new = []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([ids + new]), use_cache=False).logits  # (1, T, V)
            new.append(int(logits[0, -1].argmax()))
    return new


def test_greedy_matches_no_cache_reference_batched_and_alone(lm, tokenizer):
    encoded = [generate.encode_prompt(tokenizer, p) for p in PROMPTS]
    assert all(ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1 for ids in encoded)
    assert len({len(ids) for ids in encoded}) == len(PROMPTS)  # all lengths differ: real left padding
    references = [reference_greedy(lm, tokenizer, p, N_NEW) for p in PROMPTS]
    assert len({tuple(r) for r in references}) > 1  # the model does not emit one constant sequence
    # token ids, one padded batch
    batched_ids = generate.greedy_batch(lm, encoded, N_NEW, pad_id=tokenizer.pad_token_id)
    assert batched_ids == references
    # strings, through the public API: batched together, in batches of 3, and each alone
    expected = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in references]
    kwargs = {"max_new_tokens": N_NEW, "stop_at_eos": False, "progress": False}
    assert greedy(lm, tokenizer, PROMPTS, batch_size=4, **kwargs) == expected
    assert greedy(lm, tokenizer, PROMPTS, batch_size=3, **kwargs) == expected
    assert [greedy(lm, tokenizer, [p], **kwargs)[0] for p in PROMPTS] == expected


def test_greedy_feeds_one_token_per_step_after_prefill(lm, tokenizer):
    widths = []
    handle = lm.register_forward_pre_hook(
        lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        greedy(lm, tokenizer, PROMPTS[:2], max_new_tokens=5, stop_at_eos=False, progress=False)
    finally:
        handle.remove()
    longest = 1 + max(len(tokenizer(p)["input_ids"]) for p in PROMPTS[:2])  # + BOS
    assert widths == [longest, 1, 1, 1, 1]  # prefill once, then only the newest token (KV cache)


def test_greedy_stops_at_eos(lm, tokenizer):
    reference = reference_greedy(lm, tokenizer, PROMPTS[0], N_NEW)
    # make a token that the model produces mid-sequence the EOS token
    cut = next(i for i in range(1, N_NEW) if reference[i] not in reference[:i])
    eos_tokenizer = copy.deepcopy(tokenizer)
    eos_tokenizer.eos_token = tokenizer.convert_ids_to_tokens(reference[cut])
    calls = []
    handle = lm.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        alone = greedy(lm, eos_tokenizer, [PROMPTS[0]], max_new_tokens=N_NEW, progress=False)
    finally:
        handle.remove()
    assert alone == [tokenizer.decode(reference[:cut]).strip()]
    assert len(calls) == cut + 1  # generation stopped right after the EOS token
    # batched: each row is cut at its own first EOS, independent of the others
    batched = greedy(lm, eos_tokenizer, PROMPTS, max_new_tokens=N_NEW, progress=False)
    for prompt, text in zip(PROMPTS, batched, strict=True):
        ids = reference_greedy(lm, tokenizer, prompt, N_NEW)
        ids = ids[: ids.index(reference[cut])] if reference[cut] in ids else ids
        assert text == tokenizer.decode(ids).strip()


def test_greedy_leaves_tokenizer_and_training_mode_as_they_were(lm, tokenizer):
    expected = greedy(lm, tokenizer, PROMPTS, max_new_tokens=4, progress=False)
    lm.train()  # dropout on: greedy must still decode deterministically in eval mode
    try:
        assert tokenizer.padding_side == "right"
        assert greedy(lm, tokenizer, PROMPTS, max_new_tokens=4, progress=False) == expected
        assert lm.training and tokenizer.padding_side == "right"
    finally:
        lm.eval()
    assert greedy(lm, tokenizer, [], progress=False) == []


# ------------------------------------------------------------------------------------- task scoring


def test_parse_entities():
    assert tasks.parse_entities("Zelvorin [DRUG]; migraine [CONDITION]") == {
        ("Zelvorin", "DRUG"),
        ("migraine", "CONDITION"),
    }
    assert tasks.parse_entities("New  York [LOC]\nParis [LOC]; garbage") == {
        ("New York", "LOC"),
        ("Paris", "LOC"),
    }
    assert tasks.parse_entities("none") == set()


RECORDS = [
    {"id": "1", "task": "qa", "kind": "generation", "prompt": "Q-one", "response": "Paris"},
    {"id": "2", "task": "qa", "kind": "generation", "prompt": "Q-two", "response": "the red car"},
    {"id": "3", "task": "topic", "kind": "classification", "prompt": "C-one", "label": "medical", "response": "medical"},
    {"id": "4", "task": "topic", "kind": "classification", "prompt": "C-two", "label": "legal", "response": "legal"},
    {
        "id": "5", "task": "extractive_qa", "kind": "extractive_qa", "prompt": "E-one", "response": "Zelvorin",
        "answers": {"text": ["Zelvorin", "zelvorin tablets"], "answer_start": [0, 0]},
    },
    {
        "id": "6", "task": "extractive_qa", "kind": "extractive_qa", "prompt": "E-two", "response": "ibuprofen",
        "answers": {"text": ["ibuprofen"], "answer_start": [4]},
    },
    {"id": "7", "task": "ner", "kind": "ner", "prompt": "N-one", "response": "Zelvorin [DRUG]; migraine [CONDITION]"},
]  # fmt: skip
CANNED = {
    "Q-one": "paris.",  # EM 1, F1 1
    "Q-two": "blue car",  # EM 0, F1 1/2
    "C-one": "Medical\nbecause it mentions a drug",  # first line, normalised: correct
    "C-two": "Legal.",
    "E-one": "Zelvorin tablets\nmore text",  # matches the second gold answer
    "E-two": "aspirin",
    "N-one": "Zelvorin [DRUG]; headache [CONDITION]",  # P = R = 1/2
}


@pytest.fixture
def fake_greedy(monkeypatch):
    prompts_seen = []

    def fake(model, tokenizer, prompts, **kwargs):
        prompts_seen.extend(prompts)
        return [next(out for key, out in CANNED.items() if key in prompt) for prompt in prompts]

    monkeypatch.setattr(tasks, "greedy", fake)
    monkeypatch.setattr(tasks, "_find_renderer", lambda: None)  # scoring only: plain prompts
    return prompts_seen


def test_evaluate_records_groups_by_task_and_scores(fake_greedy):
    results = tasks.evaluate_records(None, None, RECORDS, progress=False)
    assert results["qa/exact_match"] == 0.5
    assert results["qa/token_f1"] == pytest.approx(0.75)
    assert results["qa/score"] == 0.5  # qa's main metric is exact match
    assert results["topic/accuracy"] == 1.0 and results["topic/score"] == 1.0
    assert results["extractive_qa/exact_match"] == 0.5
    assert results["extractive_qa/token_f1"] == 0.5
    assert results["ner/entity_f1"] == pytest.approx(0.5)
    assert results["score"] == pytest.approx((0.5 + 1.0 + 0.5 + 0.5) / 4)
    assert len(fake_greedy) == len(RECORDS)


def test_evaluate_records_limit_is_per_task(fake_greedy):
    results = tasks.evaluate_records(None, None, RECORDS, limit=1, progress=False)
    assert len(fake_greedy) == 4  # one record of each of the four tasks
    assert results["qa/exact_match"] == 1.0 and results["extractive_qa/exact_match"] == 1.0


def test_summarization_scores_rouge_and_evaluate_task(fake_greedy):
    records = [{"task": "summarization", "kind": "generation", "prompt": "Q-two", "response": "a blue car"}]
    scores = tasks.score_generations(records, ["blue car"])
    assert scores["score"] == scores["rouge_l"] == pytest.approx(0.8)  # LCS 2: P = 1, R = 2/3
    assert tasks.evaluate_task(None, None, RECORDS[:2], "generation", progress=False)["exact_match"] == 0.5


def test_render_falls_back_to_prompt_and_uses_a_template_module(monkeypatch):
    monkeypatch.setattr(tasks, "_find_renderer", lambda: None)
    assert tasks.render(RECORDS[0]) == "Q-one\n"
    monkeypatch.setattr(
        tasks, "_find_renderer", lambda: lambda record, template: f"<{template}>{record['prompt']}"
    )
    assert tasks.render(RECORDS[0], "alpaca") == "<alpaca>Q-one"


def test_render_uses_tunelab_templates_when_present():
    templates = pytest.importorskip("tunelab.data.templates")
    assert tasks.render(RECORDS[0], "plain") == templates.render_prompt(RECORDS[0], "plain")


def test_render_fallback_needs_a_prompt(monkeypatch):
    from tunelab.errors import DataError

    monkeypatch.setattr(tasks, "_find_renderer", lambda: None)
    with pytest.raises(DataError, match="no 'prompt'"):
        tasks.render({"id": "x", "messages": []})


def test_chat_records_are_scored_against_the_final_assistant_turn():
    record = {
        "kind": "chat",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}],
    }
    assert tasks.score_generations([record], ["hello there!"])["exact_match"] == 1.0


def test_gold_responses_score_one_on_every_builtin_task():
    synthetic = pytest.importorskip("tunelab.data.synthetic")
    for task in synthetic.TASKS:
        if task == "preference":
            continue
        records = synthetic.make_task(task, domain="all", split="validation", n=12, seed=0)
        scores = tasks.score_generations(records, [r["response"] for r in records])
        assert scores["score"] == 1.0, (task, scores)
        assert all(value == 1.0 for value in scores.values()), (task, scores)


def test_preference_records_are_refused():
    from tunelab.errors import DataError

    with pytest.raises(DataError, match="preference"):
        tasks.score_generations(
            [{"kind": "preference", "prompt": "p", "chosen": "a", "rejected": "b"}], ["a"]
        )


# --------------------------------------------------------------------------------- encoder evaluation


class OneHotModel(torch.nn.Module):
    """Predicts class ``input_id % num_labels`` at every position."""

    def __init__(self, num_labels: int, per_token: bool):
        super().__init__()
        self.num_labels, self.per_token = num_labels, per_token
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = F.one_hot(input_ids % self.num_labels, self.num_labels).float()  # (B, T, C)
        return SimpleNamespace(logits=logits if self.per_token else logits[:, 0])


def test_evaluate_classifier_argmax_accuracy():
    records = [
        {"x": x, "label": y} for x, y in [(0, 0), (1, 1), (2, 0), (4, 1), (5, 1)]
    ]  # 0,1,2,1,2 predicted

    def collator(batch):
        return {
            "input_ids": torch.tensor([[r["x"]] for r in batch]),
            "labels": torch.tensor([r["label"] for r in batch]),
        }

    result = tasks.evaluate_classifier(
        OneHotModel(3, per_token=False), records, collator, batch_size=2, progress=False
    )
    # macro-F1 by hand: class 0 F1 2/3, class 1 F1 4/5, class 2 (predicted, never true) F1 0
    assert result == {"accuracy": pytest.approx(0.6), "macro_f1": pytest.approx((2 / 3 + 4 / 5) / 3),
                      "score": pytest.approx(0.6)}


def test_evaluate_tagger_scores_first_subtokens_only():
    label_names = ["O", "B-PER", "I-PER", "B-LOC"]
    records = [
        {"ids": [0, 1, 2, 3, 0], "labels": [-100, 1, 2, -100, -100]},  # sub-token 3 (B-LOC) is ignored
        {"ids": [3, 0, 1], "labels": [3, 0, 3]},  # predicts B-LOC O B-PER, gold B-LOC O B-LOC
    ]

    def collator(batch):
        width = max(len(r["ids"]) for r in batch)
        ids = [r["ids"] + [0] * (width - len(r["ids"])) for r in batch]
        labels = [r["labels"] + [-100] * (width - len(r["labels"])) for r in batch]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    result = tasks.evaluate_tagger(
        OneHotModel(4, per_token=True), records, collator, label_names, progress=False
    )
    assert result["entity_f1"] == pytest.approx(2 / 3)  # gold PER, LOC, LOC; predicted PER, LOC, PER
    assert result["token_accuracy"] == pytest.approx(4 / 5)
