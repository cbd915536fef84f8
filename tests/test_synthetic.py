"""Tests of the built-in synthetic world (tunelab.data.synthetic): determinism, splits, task records."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from tunelab.data import synthetic
from tunelab.data.synthetic import templates, vocab
from tunelab.errors import DataError

ENTITY_HOLDOUT_TASKS = [t for t in synthetic.TASKS if t != "qa"]


def digest(records) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def names_pattern(names) -> re.Pattern:
    """Whole-word match of any of ``names`` (names may hold spaces and the '.' of 'v.')."""
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])")


@pytest.fixture(scope="module")
def world():
    return synthetic.default_world(0)


# ---------------------------------------------------------------------------- world and determinism
def test_world_counts_and_unique_names(world):
    names = [e.name for d in synthetic.DOMAINS for e in world.entities[d]]
    assert all(len(world.entities[d]) == 200 for d in synthetic.DOMAINS)
    assert len(set(names)) == len(names)
    assert {len(world.splits[d][s]) for d in synthetic.DOMAINS for s in synthetic.SPLITS} == {160, 20}
    assert any(len(n.split()) > 1 for n in names)  # multi-token names exist, for I- tags
    small = synthetic.World(seed=3, entities_per_domain=30)
    assert [len(small.entities[d]) for d in synthetic.DOMAINS] == [30] * 4
    assert [len(small.splits["legal"][s]) for s in synthetic.SPLITS] == [24, 3, 3]
    for domain in synthetic.DOMAINS:  # typed attributes, from the domain's schema
        entity = world.entities[domain][0]
        assert list(entity.attributes) == [a.name for a in vocab.ATTRIBUTES[domain]]


def test_same_seed_same_bytes_different_seed_different():
    for task in synthetic.TASKS:
        a = synthetic.make_task(task, domain="all", split="validation", n=20, seed=5)
        b = synthetic.make_task(task, domain="all", split="validation", n=20, seed=5,
                                world=synthetic.World(seed=5))  # a fresh, uncached world
        c = synthetic.make_task(task, domain="all", split="validation", n=20, seed=6)
        assert digest(a) == digest(b)
        assert digest(a) != digest(c)
    assert synthetic.corpus(n_documents=30, seed=2) == synthetic.corpus(n_documents=30, seed=2)
    assert synthetic.corpus(n_documents=30, seed=2) != synthetic.corpus(n_documents=30, seed=3)


def test_records_follow_the_schema():
    required = {"generation": {"prompt", "response"}, "classification": {"text", "label", "prompt", "response"},
                "extractive_qa": {"context", "question", "answers", "prompt", "response"},
                "ner": {"tokens", "ner_tags", "prompt", "response"}, "preference": {"prompt", "chosen", "rejected"}}
    for task in synthetic.TASKS:
        records = synthetic.make_task(task, domain=["legal", "general"], n=15)
        assert len(records) == 30 and len({r["id"] for r in records}) == 30
        for r in records:
            assert r["task"] == task and r["kind"] == synthetic.TASK_KINDS[task]
            assert r["domain"] in ("legal", "general")
            assert required[r["kind"]] <= set(r)
            assert all(isinstance(r[k], str) and r[k] for k in required[r["kind"]] & {"prompt", "response"})
            assert len(r["prompt"].split()) <= 80
            assert len(r.get("response", r.get("chosen", "")).split()) <= 20


# -------------------------------------------------------------------------------------------- splits
def test_entity_holdout_splits_are_disjoint(world):
    for task in ENTITY_HOLDOUT_TASKS:
        by_split = {s: synthetic.make_task(task, domain="all", split=s, n=25) for s in synthetic.SPLITS}
        seen = {s: {r["entity"] for r in records} for s, records in by_split.items()}
        assert not seen["train"] & seen["validation"] and not seen["train"] & seen["test"]
        assert not seen["validation"] & seen["test"]
        for split in synthetic.SPLITS:
            allowed = {e.name for d in synthetic.DOMAINS for e in world.splits[d][split]}
            assert seen[split] <= allowed
        # No train entity is even mentioned in a held-out record, whatever the meta key says.
        train_names = names_pattern(e.name for d in synthetic.DOMAINS for e in world.splits[d]["train"])
        for r in by_split["validation"] + by_split["test"]:
            assert not train_names.search(r["prompt"]), (task, r["prompt"])


def test_qa_holds_out_phrasings_not_entities(world):
    records = {s: synthetic.make_task("qa", domain="medical", split=s, n=400) for s in synthetic.SPLITS}
    skeletons = {s: {r["prompt"].replace(r["entity"], "{name}") for r in rs} for s, rs in records.items()}
    assert not skeletons["train"] & skeletons["validation"]
    assert not skeletons["train"] & skeletons["test"]
    assert not skeletons["validation"] & skeletons["test"]
    assert {r["template"] for r in records["train"]} == {0, 1, 2}
    # The same facts: held-out questions are about entities of the *train* split too, and answers match.
    train_split = {e.name for e in world.splits["medical"]["train"]}
    assert {r["entity"] for r in records["test"]} & train_split
    for r in records["test"]:
        assert r["response"] == world.entity(r["entity"]).attributes[r["attribute"]]
    # Held-out phrasings appear nowhere else: not in other tasks, not in the corpus.
    held_out = [t for q in templates.QUESTIONS["medical"].values() for t in q[3:]]
    patterns = [re.compile(re.escape(t).replace(re.escape("{name}"), ".+")) for t in held_out]
    others = [r["prompt"] for t in ENTITY_HOLDOUT_TASKS for r in synthetic.make_task(t, "medical", n=40)]
    others += synthetic.corpus("medical", n_documents=60)
    lines = [line.removeprefix("Question: ") for text in others for line in text.split("\n")]
    assert not [line for line in lines if any(p.fullmatch(line) for p in patterns)]
    assert any(p.fullmatch(r["prompt"]) for r in records["validation"] for p in patterns)  # the check bites


def test_question_phrasings_are_unambiguous():
    for domain, by_attribute in templates.QUESTIONS.items():
        phrasings = [t for q in by_attribute.values() for t in q]
        assert len(set(phrasings)) == len(phrasings) == 5 * len(vocab.ATTRIBUTES[domain]), domain


# ---------------------------------------------------------------------------------------------- tasks
def test_summary_fields_are_copied_from_the_note(world):
    for r in synthetic.make_task("summarization", domain="all", split="test", n=40):
        entity = world.entity(r["entity"])
        fields = r["response"].split(" | ")
        assert fields == [entity.name] + [entity.attributes[a] for a in vocab.SUMMARY_ATTRIBUTES[r["domain"]]]
        assert all(f in r["prompt"] for f in fields)
        assert any(d in r["prompt"] for d in templates.DISTRACTORS[r["domain"]])


def test_extractive_qa_spans_index_the_context(world):
    for r in synthetic.make_task("extractive_qa", domain="all", split="validation", n=50):
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        assert r["context"][start:start + len(text)] == text == r["response"]
        assert text == world.entity(r["entity"]).attributes[r["attribute"]]
        assert r["prompt"].endswith(f"Context: {r['context']}\nQuestion: {r['question']}")


def test_ner_tags_are_valid_bio_and_match_the_response():
    labels = synthetic.label_names("ner")
    saw_inside = False
    for r in synthetic.make_task("ner", domain="all", split="test", n=80):
        tokens, tags = r["tokens"], r["ner_tags"]
        assert len(tokens) == len(tags) and r["prompt"] == "Tag the entities: " + " ".join(tokens)
        assert set(tags) <= set(labels)
        spans, previous = [], "O"
        for token, tag in zip(tokens, tags, strict=True):
            if tag.startswith("I-"):
                assert previous[2:] == tag[2:] and previous != "O", tags  # I- only continues its type
                spans[-1][0].append(token)
                saw_inside = True
            elif tag.startswith("B-"):
                spans.append(([token], tag[2:]))
            previous = tag
        assert r["response"] == "; ".join(f"{' '.join(words)} [{t}]" for words, t in spans)
        assert f"[{vocab.ENTITY_TYPE[r['domain']]}]" in r["response"]
    assert saw_inside


def test_preference_chosen_is_correct_and_rejected_is_wrong(world):
    sources = set()
    for r in synthetic.make_task("preference", domain="all", split="train", n=40):
        entity, attribute = world.entity(r["entity"]), r["attribute"]
        assert r["chosen"] != r["rejected"]
        sources.add(r["source"])
        if r["source"] == "summarization":
            truth = [entity.name] + [entity.attributes[a] for a in vocab.SUMMARY_ATTRIBUTES[r["domain"]]]
            assert r["chosen"].split(" | ") == truth
            wrong = r["rejected"].split(" | ")
            assert sum(a != b for a, b in zip(truth, wrong, strict=True)) == 1
            position = 1 + vocab.SUMMARY_ATTRIBUTES[r["domain"]].index(attribute)
            assert wrong[position] in world.values(r["domain"], attribute)  # same type, wrong value
        else:
            assert r["chosen"] == entity.attributes[attribute] and r["chosen"] in r["prompt"]
            assert r["rejected"] in world.values(r["domain"], attribute)
    assert sources == {"summarization", "extractive_qa"}


def test_classification_labels_follow_their_rules():
    assert synthetic.label_names("domain_classification") == list(synthetic.DOMAINS)
    assert synthetic.label_names("urgency") == ["low", "medium", "high"]
    for r in synthetic.make_task("domain_classification", domain="all", n=20):
        assert r["label"] == r["response"] == r["domain"] and r["prompt"].endswith(r["text"])
    labels = set()
    for r in synthetic.make_task("urgency", domain="all", split="test", n=60):
        cues = vocab.URGENCY_CUES[r["domain"]]
        words = re.findall(r"[A-Za-z]+", r["text"])
        found = [level for level, cue_words in cues.items() for w in words if w in cue_words]
        assert found == [r["label"]] and r["response"] == r["label"], r["text"]  # exactly one cue word
        labels.add(r["label"])
    assert labels == set(synthetic.label_names("urgency"))


def test_translation_follows_the_three_rules(world):
    lexicon = world.translator.lexicon
    assert len(set(lexicon.values())) == len(lexicon) and not set(lexicon.values()) & set(lexicon)
    for r in synthetic.make_task("translation", domain="all", split="validation", n=60):
        source = r["prompt"].removeprefix("Translate to Zemish: ").split()
        verbs = [w for w in source if w in templates.TRANSLATION_VERBS]
        assert len(verbs) == 1
        kept = [w for w in source if w not in ("the", "a", "an") and w != verbs[0]]
        for w in kept:  # every lowercase word is translated; names, numbers and "v." are copied
            assert w in lexicon or not (w.isalpha() and w.islower()), w
        assert r["response"].split() == [lexicon.get(w, w) for w in kept] + [lexicon[verbs[0]]]
    hand = synthetic.Translator(0, {"court", "heard", "in"})
    lex = hand.lexicon
    assert hand.translate("the court heard Ashby v. Holworth in 1987") == (
        f"{lex['court']} Ashby v. Holworth {lex['in']} 1987 {lex['heard']}")
    assert synthetic.Translator(0, {"court"}).lexicon == synthetic.Translator(0, {"court"}).lexicon
    assert synthetic.World(seed=1).translator.lexicon != lexicon


def test_domains_share_formats_but_not_entities(world):
    general = synthetic.make_task("summarization", domain="general", n=5)
    medical = synthetic.make_task("summarization", domain="medical", n=5)
    assert all(r["prompt"].startswith("Summarize the note: ") for r in general + medical)
    general_names = {e.name for e in world.entities["general"]}
    assert not general_names & {e.name for e in world.entities["medical"]}
    assert not set(vocab.VALUES["medical"]["condition"]) & {v for e in world.entities["general"]
                                                            for v in e.attributes.values()}


# --------------------------------------------------------------------------------------------- corpus
def test_corpus_documents_and_split_disjointness(world):
    train_docs = synthetic.corpus(domains="all", n_documents=150, split="train")
    held_out = synthetic.corpus(domains="all", n_documents=150, split="validation")
    assert len(train_docs) == 150 and all(40 <= len(d.split()) <= 160 for d in train_docs + held_out)
    train_names = names_pattern(e.name for d in synthetic.DOMAINS for e in world.splits[d]["train"])
    other_names = names_pattern(e.name for d in synthetic.DOMAINS for s in ("validation", "test")
                                for e in world.splits[d][s])
    assert not any(train_names.search(d) for d in held_out)
    assert not any(other_names.search(d) for d in train_docs)
    general = "\n".join(synthetic.corpus(domains=("general",), n_documents=200))
    for prefix in ("Summarize the note: ", "Translate to Zemish: ", "Answer from the context.", "Tag the entities: "):
        assert prefix in general
    medical_names = names_pattern(e.name for e in world.entities["medical"])
    assert not medical_names.search(general)


def test_ten_thousand_examples():
    records = synthetic.make_task("summarization", domain="all", n=1500)
    records += synthetic.make_task("qa", domain="all", n=1000)
    records += synthetic.make_task("ner", domain="medical", n=0)
    assert len(records) == 10_000 and len({r["id"] for r in records}) == 10_000


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda: synthetic.make_task("chat"), "summarization"),
        (lambda: synthetic.make_task("qa", domain="finance"), "medical"),
        (lambda: synthetic.make_task("qa", domain=["medical", "law"]), "legal"),
        (lambda: synthetic.make_task("qa", domain=[]), "technical"),
        (lambda: synthetic.make_task("qa", split="dev"), "validation"),
        (lambda: synthetic.make_task("qa", n=-1), ">= 0"),
        (lambda: synthetic.make_task("qa", n=2.5), ">= 0"),
        (lambda: synthetic.label_names("qa"), "urgency"),
        (lambda: synthetic.corpus(domains=("sports",)), "general"),
        (lambda: synthetic.corpus(split="holdout"), "test"),
        (lambda: synthetic.corpus(n_documents=-3), ">= 0"),
        (lambda: synthetic.World(entities_per_domain=3), ">= 10"),
    ],
)
def test_bad_input_raises_one_line_data_error(call, expected):
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and expected in message
