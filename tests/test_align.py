"""Alignment objectives: DPO/KTO/reward/PPO/GRPO on the shared loop, and their explicit reference.

The losses themselves equal TRL 1.16's (tests/test_align_losses.py pins how). Here, on a tiny random
Llama with a LoRA adapter, the objectives must compute exactly those losses from sequence log-probs
taken with and without the adapter (so the objective = TRL's trainer given the same log-probs), keep
the reference honest (no second model, frozen copies, caches, the step-0 check), and train end to end.
"""

from __future__ import annotations

import json

import pytest
import torch

from tunelab import tuners
from tunelab.align import DPOObjective, GRPOObjective, KTOObjective, PPOObjective, RewardObjective
from tunelab.align.logps import pair_logps
from tunelab.align.losses import dpo_loss, kto_kl_estimate, kto_loss, sequence_logps
from tunelab.data import synthetic
from tunelab.errors import ConfigError
from tunelab.experiments import registry
from tunelab.models import tiny
from tunelab.train import train

STEPS = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tokenizer(synthetic.corpus(domains=("medical",), n_documents=200, seed=0), 400)


@pytest.fixture(scope="module")
def pairs():
    return synthetic.make_task("preference", domain="medical", split="train", n=12, seed=0)


def lora_model(tokenizer, trained: bool = False):
    """A tiny random Llama with a LoRA adapter; ``trained`` randomises B so the policy != the base."""
    spec = tiny.TinySpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = tuners.apply(tiny.build_model(spec, tokenizer, seed=0), "lora", r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj"])
    if trained:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            for _, p in tuners.trainable_parameters(model):
                p.normal_(0, 0.3)
    return model


def objective(name, tokenizer, **options):
    obj = registry.build_objective(name, options)
    obj.collator(tokenizer, None, max_length=96, template="plain")
    return obj


def setup(obj, model):
    obj.setup(model, type("Accelerator", (), {"device": torch.device("cpu")})())
    return obj


def separate_logps(model, tokenizer, records, average):
    """log π(chosen), log π(rejected) from *separate* unpadded forwards per sequence (no concatenation)."""
    collate = objective("dpo", tokenizer).collate_fn
    out = {"chosen": [], "rejected": []}
    for record in records:
        batch = collate([record])
        for side in out:
            ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
            keep = batch[f"{side}_attention_mask"][0].bool()
            logits = model(input_ids=ids[:, keep]).logits
            out[side].append(sequence_logps(logits, labels[:, keep], average=average))
    return torch.cat(out["chosen"]), torch.cat(out["rejected"])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_objective_equals_dpo_loss_on_logps_with_and_without_the_adapter(tokenizer, pairs, loss_type):
    model = lora_model(tokenizer, trained=True).eval()
    obj = setup(objective("dpo", tokenizer, loss_type=loss_type, beta=0.2, label_smoothing=0.1,
                          check_reference=False), model)
    batch = obj.collate_fn(pairs[:4])
    out = obj.loss(model, batch)
    average = loss_type == "ipo"  # TRL 1.16 IPO: length-averaged log-probs
    with torch.no_grad():
        policy = separate_logps(model, tokenizer, pairs[:4], average)
        with tuners.disabled(model):
            reference = separate_logps(model, tokenizer, pairs[:4], average)
    losses, chosen, rejected = dpo_loss(*policy, *reference, beta=0.2, loss_type=loss_type, label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(losses.mean().item(), abs=1e-5)
    assert out.metrics["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert out.metrics["rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5)
    assert out.metrics["rewards/margins"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert abs(chosen).sum() > 0  # the adapter really changed the policy


def test_dpo_sft_weight_adds_the_chosen_token_nll(tokenizer, pairs):
    """RPO: loss = DPO + α · (−Σ log π(y_w) / Σ |y_w|), from separate unpadded forwards; ORPO refuses it."""
    model = lora_model(tokenizer, trained=True).eval()
    obj = setup(objective("dpo", tokenizer, beta=0.2, sft_weight=0.7, check_reference=False), model)
    batch = obj.collate_fn(pairs[:4])
    out = obj.loss(model, batch)
    with torch.no_grad():
        policy = separate_logps(model, tokenizer, pairs[:4], average=False)
        with tuners.disabled(model):
            reference = separate_logps(model, tokenizer, pairs[:4], average=False)
        per_token = separate_logps(model, tokenizer, pairs[:4], average=True)[0]
    losses, _, _ = dpo_loss(*policy, *reference, beta=0.2)
    tokens = policy[0] / per_token  # each chosen completion's length, from its unpadded forward
    assert len(set(tokens.round().tolist())) > 1  # lengths differ: a mean of per-pair means would not match
    nll = -policy[0].sum() / tokens.sum()
    assert out.metrics["nll"] == pytest.approx(nll.item(), abs=1e-5)
    assert out.loss.item() == pytest.approx((losses.mean() + 0.7 * nll).item(), abs=1e-5)
    with pytest.raises(ConfigError, match="orpo already includes"):
        objective("dpo", tokenizer, loss_type="orpo", sft_weight=1.0)


def test_kto_objective_equals_kto_loss(tokenizer, pairs):
    model = lora_model(tokenizer, trained=True).eval()
    obj = setup(objective("kto", tokenizer, beta=0.3, check_reference=False), model)
    batch = obj.collate_fn(pairs[:3])  # 6 unpaired rows: chosen desirable, rejected undesirable
    out = obj.loss(model, batch)

    def logps(prefix):
        logits = model(input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"]).logits
        return sequence_logps(logits, batch[f"{prefix}labels"])

    with torch.no_grad():
        policy, policy_kl = logps(""), logps("kl_")
        with tuners.disabled(model):
            reference, reference_kl = logps(""), logps("kl_")
    kl = kto_kl_estimate(policy_kl, reference_kl)
    losses, _ = kto_loss(policy, reference, batch["desirable"], kl, beta=0.3)
    assert batch["desirable"].tolist() == [True, False] * 3
    assert out.loss.item() == pytest.approx(losses.mean().item(), abs=1e-5)
    assert out.metrics["kl"] == pytest.approx(kl.item(), abs=1e-6)


def test_prompt_tokens_are_masked_and_chat_templates_apply(tokenizer, pairs):
    plain, chatml = objective("dpo", tokenizer), objective("dpo", tokenizer)
    batch = plain.collator(tokenizer, None, max_length=512, template="plain")(pairs[:2])
    chat_batch = chatml.collator(tokenizer, None, max_length=512, template="chatml")(pairs[:2])
    for b in (batch, chat_batch):
        scored = (b["chosen_labels"] != -100).sum(-1)
        real = b["chosen_attention_mask"].sum(-1)
        assert (scored > 0).all() and (scored < real).all()  # the prompt is never scored
    assert chat_batch["chosen_input_ids"].shape[1] > batch["chosen_input_ids"].shape[1]  # template tokens
    answer = tokenizer(" " + pairs[0]["chosen"], add_special_tokens=False)["input_ids"]
    scored_ids = batch["chosen_input_ids"][0][batch["chosen_labels"][0] != -100].tolist()
    assert len(scored_ids) >= len(answer) - 1  # the completion (+ EOS) is what is scored


def test_reference_base_keeps_no_second_model(tokenizer, pairs):
    model = lora_model(tokenizer)
    before = sum(p.numel() for p in model.parameters())
    obj = objective("dpo", tokenizer)
    train(model, pairs, obj, STEPS, progress=False)
    assert sum(p.numel() for p in model.parameters()) == before
    assert obj.modules() == [] and obj.reference.snapshot is None and obj.reference.cache == {}


def test_sft_adapter_reference_is_a_frozen_copy_of_the_trainable_tensors(tokenizer, pairs):
    model = lora_model(tokenizer, trained=True)
    trainable = {n: p.detach().clone() for n, p in tuners.trainable_parameters(model)}
    obj = objective("dpo", tokenizer, reference="sft_adapter")
    result = train(model, pairs, obj, STEPS, progress=False)
    snapshot = obj.reference.snapshot
    assert set(snapshot) == set(trainable)  # adapter tensors only, not a model copy
    assert sum(t.numel() for t in snapshot.values()) < 0.1 * sum(p.numel() for p in model.parameters())
    assert all(torch.equal(snapshot[n], trainable[n]) for n in trainable)  # frozen
    assert any(not torch.equal(p, trainable[n]) for n, p in tuners.trainable_parameters(model))  # policy moved
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 0: π = π_ref
    with torch.no_grad():  # the reference is the adapter as it was, whatever the policy did since
        batch = obj.collate_fn(pairs[:2])
        model.eval()
        reference = obj.reference.logps(model, batch, pair_logps)
        live = {n: p.detach().clone() for n, p in tuners.trainable_parameters(model)}
        for n, p in tuners.trainable_parameters(model):
            p.copy_(trainable[n])
        expected = pair_logps(model, batch)
        for n, p in tuners.trainable_parameters(model):
            p.copy_(live[n])
    assert torch.allclose(reference, expected, atol=1e-5)


def test_precomputed_reference_is_computed_once_per_record(tokenizer, pairs, monkeypatch):
    model = lora_model(tokenizer)
    obj = objective("dpo", tokenizer, reference="precomputed")
    calls = []
    original = obj.reference.active

    def counting(m):
        calls.append(1)
        return original(m)

    monkeypatch.setattr(obj.reference, "active", counting)
    train(model, pairs, obj, {**STEPS, "max_steps": 4}, progress=False)
    assert len(obj.reference.cache) == len(pairs)
    assert len(calls) == 3  # 12 records in batches of 4, all before the first step; none per step


def test_step0_check_stops_a_wrong_reference(tokenizer, pairs):
    model = lora_model(tokenizer, trained=True)  # as after an SFT stage on this adapter
    with pytest.raises(ConfigError, match=r"dpo: at step 0 the policy differs from the reference.*sft_adapter"):
        train(model, pairs, objective("dpo", tokenizer, reference="base"), STEPS, progress=False)
    with pytest.raises(ConfigError, match="kto: at step 0"):
        train(model, pairs, objective("kto", tokenizer, reference="base"), STEPS, progress=False)
    train(model, pairs, objective("dpo", tokenizer, reference="sft_adapter"), STEPS, progress=False)  # fine


def test_reference_free_losses_and_option_errors(tokenizer, pairs):
    assert DPOObjective(loss_type="simpo").reference.mode == "none"
    with pytest.raises(ConfigError, match="reference"):
        registry.build_objective("dpo", {"loss_type": "orpo", "reference": "base"})
    with pytest.raises(ConfigError, match="beta"):
        registry.build_objective("dpo", {"beta": -1})
    model = lora_model(tokenizer)
    result = train(model, pairs, objective("dpo", tokenizer, loss_type="orpo"), STEPS, progress=False)
    assert result.history[0]["loss"] > 0


def test_reward_model_separates_a_trivially_separable_set(tokenizer):
    good, bad = "yes the answer is right", "no wrong wrong wrong"
    records = [{"id": str(i), "prompt": f"question {i} about item {i * 7}", "chosen": good if i % 2 else bad,
                "rejected": bad if i % 2 else good} for i in range(40)]
    for r in records:  # chosen is always the "good" string
        r["chosen"], r["rejected"] = good, bad
    model = lora_model(tokenizer)
    obj = objective("reward", tokenizer, center_rewards_coefficient=0.01)
    train(model, records[:32], obj, {"max_steps": 30, "batch_size": 8, "learning_rate": 2e-2}, progress=False)
    assert isinstance(obj, RewardObjective) and len(obj.modules()) == 1
    assert obj.evaluate(model, records[32:])["accuracy"] == 1.0


def test_reward_stage_adapter_is_taken_off_and_back_for_evaluation(tokenizer, pairs):
    model = lora_model(tokenizer, trained=True)  # the "SFT" adapter, frozen below
    reference = model(input_ids=torch.tensor([[1, 5, 9]])).logits.detach()
    tuners.add_adapter(model, tuners.build_config("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}), "rm")
    tuners.set_active(model, ["default", "rm"])
    for name, p in model.named_parameters():
        p.requires_grad_(".rm." in name)
    obj = objective("reward", tokenizer)
    train(model, pairs, obj, STEPS, progress=False)
    obj.on_stage_end(model, pairs)
    assert list(tuners.adapters(model)) == ["default"]
    assert torch.allclose(model(input_ids=torch.tensor([[1, 5, 9]])).logits, reference)  # policy untouched
    assert "accuracy" in obj.evaluate(model, pairs[:4])
    assert list(tuners.adapters(model)) == ["default"]


class TokenReward:
    """A stand-in reward model: a deterministic function of the tokens (gives non-zero advantages)."""

    def score(self, sequences, attention_mask):
        return ((sequences * attention_mask).sum(-1) % 7).float()


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_online_step_changes_only_trainable_parameters(tokenizer, pairs, name):
    model = lora_model(tokenizer)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    obj = objective(name, tokenizer, max_new_tokens=6, num_iterations=2)
    obj.scorer = TokenReward()
    result = train(model, pairs, obj, STEPS, progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    first = result.history[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-4) and "reward" in first
    if name == "ppo":
        assert isinstance(obj, PPOObjective) and obj.modules()[0].specs["value"].pooling == "none"
        assert "kl_controller" in obj.state_dict()
    else:
        assert isinstance(obj, GRPOObjective) and obj.modules() == []
    assert "score" in obj.evaluate(model, pairs[:2])


def test_token_f1_reward_gives_partial_credit_and_evaluation_still_reports_exact_match(tokenizer, pairs):
    from tunelab.align.rollout import Rollout, exact_match_rewards, token_f1_rewards

    texts = ["blue river\nmore", "blue", "red", "anything"]
    answers = ["blue river", "blue river", "blue river", None]
    assert exact_match_rewards(texts, answers).tolist() == [1.0, 0.0, 0.0, 0.0]
    # first line only; "blue" vs "blue river": precision 1, recall 1/2 -> F1 2/3; no answer -> 0
    assert token_f1_rewards(texts, answers).tolist() == pytest.approx([1.0, 2 / 3, 0.0, 0.0])
    model = lora_model(tokenizer)
    obj = setup(objective("grpo", tokenizer, reward="token_f1", max_new_tokens=4, check_reference=False), model)
    rollout = Rollout.__new__(Rollout)
    rollout.texts = texts[:3]
    assert obj.score(rollout, answers[:3]).tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    records = [{**p, "answer": p["chosen"]} for p in pairs[:3]]
    scores = obj.evaluate(model, records)
    assert {"exact_match", "token_f1", "score"} <= set(scores) and scores["score"] == scores["exact_match"]
    assert 0.0 <= scores["exact_match"] <= scores["token_f1"] <= 1.0


def test_rollout_log_probs_are_those_of_the_sampling_temperature(tokenizer, pairs):
    """token_logps scores a rollout sampled at T with log softmax(logits / T), as TRL's GRPO / PPO do."""
    from tunelab.align.rollout import sample, token_logps

    model = lora_model(tokenizer, trained=True).eval()
    prompts = [p["prompt"] for p in pairs[:2]]
    torch.manual_seed(0)
    rollout = sample(model, tokenizer, prompts, num_generations=2, max_new_tokens=5, temperature=0.7)
    assert rollout.temperature == 0.7
    with torch.no_grad():
        logps, _ = token_logps(model, rollout)
        logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                       position_ids=rollout.position_ids).logits.float()
    p, s = rollout.prompt_length, rollout.completion_mask.shape[1]
    expected = torch.log_softmax(logits[:, p - 1 : p + s - 1] / 0.7, -1).gather(
        -1, rollout.sequences[:, p:, None]).squeeze(-1) * rollout.completion_mask
    assert torch.allclose(logps, expected, atol=1e-5)
    at_one = torch.log_softmax(logits[:, p - 1 : p + s - 1], -1).gather(-1, rollout.sequences[:, p:, None]).squeeze(-1)
    assert not torch.allclose(logps, at_one * rollout.completion_mask, atol=1e-3)  # the temperature matters
    greedy = sample(model, tokenizer, prompts, max_new_tokens=5, temperature=0.0)
    with torch.no_grad():
        greedy_logps, _ = token_logps(model, greedy)
    assert bool((greedy_logps <= 0).all())  # greedy: scored at T = 1, no division by zero


def test_sample_diagnostics_say_which_wrong_answers_sampling_can_reach(tokenizer, pairs):
    from tunelab.align.online import sample_diagnostics

    greedy = [1.0, 0.0, 0.0, 0.0]
    sampled = [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    got = sample_diagnostics(greedy, sampled)
    assert got["sampled_exact_match"] == pytest.approx(3 / 16)
    assert got["pass_at_k"] == pytest.approx(2 / 4)
    assert got["reachable"] == pytest.approx(1 / 3)  # of the 3 greedily-wrong prompts, one has a correct sample
    assert sample_diagnostics([1.0], [[0, 0]])["reachable"] == 1.0  # nothing wrong: nothing to reach
    model = lora_model(tokenizer)
    obj = setup(objective("grpo", tokenizer, max_new_tokens=4, eval_samples=3, check_reference=False), model)
    records = [{**p, "answer": p["chosen"]} for p in pairs[:3]]
    scores = obj.evaluate(model, records)
    assert {"sampled_exact_match", "pass_at_k", "reachable"} <= set(scores)
    assert 0.0 <= scores["sampled_exact_match"] <= scores["pass_at_k"] <= 1.0
    plain = setup(objective("grpo", tokenizer, max_new_tokens=4, check_reference=False), model).evaluate(model, records)
    assert "pass_at_k" not in plain  # off by default: k samples per prompt cost k decodes


def test_kto_accepts_unpaired_records(tokenizer):
    records = [{"id": str(i), "prompt": f"q{i}", "completion": "fine answer", "label": i % 2 == 0} for i in range(8)]
    model = lora_model(tokenizer)
    obj = objective("kto", tokenizer)
    assert isinstance(obj, KTOObjective)
    train(model, records, obj, STEPS, progress=False)
    assert "reward_margin" in obj.evaluate(model, records)


def test_sft_then_dpo_stages_end_to_end(tmp_path, small_model_dir):
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import load_spec

    config = tmp_path / "align.yaml"
    config.write_text(
        f"name: align\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: '{small_model_dir}'}}\n"
        "method: {name: lora, options: {r: 4, target_modules: [q_proj, v_proj]}}\n"
        "data: {tasks: [preference], domain: medical, train_size: 8, eval_size: 0, test_size: 4, max_length: 96}\n"
        "train: {max_steps: 2, batch_size: 4, eval_every: null, save_every: null, log_every: 1}\n"
        "eval: {max_new_tokens: 4, latency_batches: 1}\n"
        "stages:\n"
        "  - {name: sft, objective: sft, data: {tasks: [qa]}}\n"
        "  - {name: dpo, objective: {name: dpo, options: {reference: sft_adapter, beta: 0.1}}}\n")
    run_experiment(load_spec(config), progress=False, isolate=False)
    results = list((tmp_path / "runs" / "align" / "results").glob("*.json"))
    assert len(results) == 1
    record = json.loads(results[0].read_text())
    assert [s["name"] for s in record["stages"]] == ["sft", "dpo"]
    assert "preference_accuracy" in record["metrics"] and "generation_exact_match" in record["metrics"]
    dpo_events = [e for e in record["history"] if e.get("stage") == "dpo" and "rewards/margins" in e]
    assert dpo_events and dpo_events[0]["kl"] == pytest.approx(0.0, abs=1e-4)


def test_saved_reward_model_scores_like_the_trained_one(tmp_path, small_model_dir, pairs):
    from tunelab.align import RewardModel
    from tunelab.models import zoo

    model, tokenizer = zoo.load(str(small_model_dir), task="causal_lm", progress=False)
    tuners.apply(model, "lora", r=4, target_modules=["q_proj", "v_proj"])
    obj = objective("reward", tokenizer, save_dir=str(tmp_path / "rm"))
    train(model, pairs, obj, STEPS, progress=False)
    obj.on_stage_end(model, pairs)
    batch = obj.collate_fn(pairs[:3])
    with torch.no_grad():
        chosen, _ = obj.rewards(model.eval(), batch)
    loaded = RewardModel.load(tmp_path / "rm")
    scores = loaded.score(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    assert torch.allclose(scores, chosen, atol=1e-5)
    grpo = objective("grpo", tokenizer, reward="model", reward_model=str(tmp_path / "rm"), max_new_tokens=4)
    setup(grpo, model)
    assert grpo.scorer is not None


def test_completion_pooling_reads_only_the_completion_and_survives_save_and_load(tmp_path, small_model_dir, pairs):
    """pooling: completion is r(x, y) = w · mean_{t in y} h_t + b over the completion's tokens (+ EOS) only:
    checked against the last hidden states by hand; the prompt's tokens do not enter the mean; the saved
    reward model needs the completion mask and then scores as trained."""
    from tunelab.align import RewardModel
    from tunelab.errors import ModelError
    from tunelab.models import zoo

    model, tokenizer = zoo.load(str(small_model_dir), task="causal_lm", progress=False)
    tuners.apply(model, "lora", r=4, target_modules=["q_proj", "v_proj"])
    obj = objective("reward", tokenizer, pooling="completion", save_dir=str(tmp_path / "rm"))
    train(model, pairs, obj, STEPS, progress=False)
    obj.on_stage_end(model, pairs)
    model.eval()
    batch = obj.collate_fn(pairs[:3])
    with torch.no_grad():
        chosen, rejected = obj.rewards(model, batch)
        hidden = model(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"],
                       output_hidden_states=True).hidden_states[-1]  # (B, T, H)
    completion = (batch["chosen_labels"] != -100) & batch["chosen_attention_mask"].bool()  # (B, T)
    assert completion.any(1).all() and (~completion & batch["chosen_attention_mask"].bool()).any(1).all()
    mean = (hidden * completion.unsqueeze(-1)).sum(1) / completion.sum(1, keepdim=True)  # (B, H)
    head = obj.heads.heads["reward"].project
    assert torch.allclose(chosen, head(mean).squeeze(-1), atol=1e-5)
    whole = (hidden * batch["chosen_attention_mask"].unsqueeze(-1)).sum(1) / batch["chosen_attention_mask"].sum(
        1, keepdim=True)  # the mean over prompt + completion: a different number
    assert not torch.allclose(chosen, head(whole).squeeze(-1), atol=1e-3)
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded.needs_completion_mask  # what GRPO / PPO check before passing the rollout's mask
    with pytest.raises(ModelError, match="completion_mask"):
        loaded.score(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    scores = loaded.score(batch["chosen_input_ids"], batch["chosen_attention_mask"], completion)
    assert torch.allclose(scores, chosen, atol=1e-5)


def test_kto_on_a_user_jsonl_file_end_to_end(tmp_path, small_model_dir):
    """A KTO file (prompt / completion / label) keeps its labels through the loader and trains with kto."""
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import load_spec

    rows = [{"prompt": f"Where does patient {i} live?", "completion": f"In town {i}.", "label": [True, 0, "false",
             "desirable"][i % 4]} for i in range(12)]
    data = tmp_path / "feedback.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "kto.yaml"
    config.write_text(
        f"name: kto\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: '{small_model_dir}'}}\n"
        "method: {name: lora, options: {r: 4, target_modules: [q_proj, v_proj]}}\n"
        "objective: {name: kto, options: {reference: base}}\n"
        f"data: {{source: '{data}', train_size: 8, eval_size: 0, test_size: 4, max_length: 64}}\n"
        "train: {max_steps: 2, batch_size: 4, eval_every: null, save_every: null, log_every: 1}\n"
        "eval: {max_new_tokens: 4, latency_batches: 0}\n")
    [record] = run_experiment(load_spec(config), progress=False, isolate=False)
    assert {"reward_desirable", "reward_undesirable", "reward_margin"} <= set(record["metrics"])
    steps = [e for e in record["history"] if "kl" in e]
    assert len(steps) == 2 and any("rewards/chosen" in e for e in steps) and any("rewards/rejected" in e for e in steps)


def test_disable_dropout_lasts_for_its_own_stage_only(tmp_path, small_model_dir, monkeypatch):
    """SFT (LoRA dropout 0.1) -> DPO (disable_dropout) -> SFT: the last stage trains with dropout 0.1 again."""
    from torch import nn

    from tunelab.align.dpo import DPOObjective
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import load_spec
    from tunelab.objectives.sft import SFTObjective

    seen = []

    def probe(cls):
        original = cls.setup

        def setup(self, model, accelerator):
            original(self, model, accelerator)
            seen.append((cls.__name__, sorted({m.p for m in model.modules() if isinstance(m, nn.Dropout)})))

        monkeypatch.setattr(cls, "setup", setup)

    probe(SFTObjective)
    probe(DPOObjective)
    config = tmp_path / "align.yaml"
    config.write_text(
        f"name: align\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: '{small_model_dir}'}}\n"
        "method: {name: lora, options: {r: 4, lora_dropout: 0.1, target_modules: [q_proj, v_proj]}}\n"
        "data: {tasks: [preference], domain: medical, train_size: 8, eval_size: 0, test_size: 2, max_length: 64}\n"
        "train: {max_steps: 1, batch_size: 4, eval_every: null, save_every: null, log_every: 1}\n"
        "eval: {max_new_tokens: 2, latency_batches: 0}\n"
        "stages:\n"
        "  - {name: sft, objective: sft, data: {tasks: [qa]}}\n"
        "  - {name: dpo, objective: {name: dpo, options: {reference: sft_adapter, eval_generation: false}}}\n"
        "  - {name: sft2, objective: sft, data: {tasks: [qa]}}\n")
    run_experiment(load_spec(config), progress=False, isolate=False)
    assert seen == [("SFTObjective", [0.1]), ("DPOObjective", [0.0]), ("SFTObjective", [0.1])]


def test_a_run_resumed_after_its_reward_stage_gets_the_reward_model_back(tmp_path, small_model_dir):
    """SFT, a reward model on its own adapter stacked on that policy, then SFT on a new adapter: killed after the
    reward stage, the
    resumed cell restores the reward head and takes the reward adapter off again (same scores as straight),
    and the cell's outputs hold a reward model that RewardModel.load scores with."""
    import shutil

    from transformers import AutoConfig

    from tunelab.align import RewardModel
    from tunelab.experiments.grid import expand_grid
    from tunelab.experiments.runner import run_cell
    from tunelab.experiments.spec import validate

    lora = {"name": "lora", "options": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}
    raw = {"name": "rm", "output_dir": str(tmp_path), "model": {"name": str(small_model_dir)}, "method": lora,
           "data": {"tasks": ["qa"], "domain": "medical", "train_size": 8, "eval_size": 0, "test_size": 4,
                    "max_length": 64},
           "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 3e-2, "save_every": None, "log_every": 1},
           "eval": {"max_new_tokens": 2, "latency_batches": 0},
           "stages": [{"name": "policy", "objective": "sft"},
                      {"name": "rm", "objective": "reward", "method": lora, "data": {"tasks": ["preference"]}},
                      {"name": "sft", "objective": "sft", "method": lora}]}
    cell = expand_grid(validate(raw))[0]
    straight = run_cell(cell, tmp_path / "straight", progress=False)
    partial = tmp_path / "partial"
    run_cell(cell, partial, progress=False)
    for path in (partial / ".work" / cell.run_id).glob("*-2*"):  # the run died in stage 3
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run_cell(cell, partial, progress=False)
    assert resumed["stage_matrix"]["metrics"] == straight["stage_matrix"]["metrics"]
    # each stage counts what it trained, the reward stage its adapter *and* head (taken off after it)
    policy, rm, sft = (stage["trainable_parameters"] for stage in straight["stages"])
    hidden = AutoConfig.from_pretrained(small_model_dir).hidden_size
    assert policy == sft and rm == policy + hidden + 1  # same LoRA shape; the scalar head is hidden -> 1
    assert straight["trainable_parameters"] == sft
    assert [h.get("loss") for h in resumed["history"]] == [h.get("loss") for h in straight["history"]]
    assert resumed["outputs"]["reward_model"] == f"adapters/{cell.run_id}/reward"
    reward_dirs = [run / "adapters" / cell.run_id / "reward" for run in (tmp_path / "straight", partial)]
    assert json.loads((reward_dirs[0] / "reward_model.json").read_text())["trained"] == ["rm"]
    scores = []
    for directory in reward_dirs:
        loaded = RewardModel.load(directory)
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
        scores.append(loaded.score(ids, torch.ones_like(ids)))
    assert torch.equal(scores[0], scores[1])


def test_context_bonus_rewards_answers_copied_from_the_context(tokenizer, pairs):
    """r = EM + b · [normalised answer is a run of whole words of the normalised context]."""
    from tunelab.align.rollout import Rollout, in_context_rewards
    from tunelab.errors import ConfigError

    context = "The maker of Vexdex is Genant Pharma. Each tablet contains 250 mg."
    texts = ["Genant Pharma", "250 mg\nextra", "Dexois Biotech", "Genant Pharm", ""]
    contexts = [context] * 4 + [context]
    # whole words only ("Genant Pharm" is not a span); the empty answer is never in context
    assert in_context_rewards(texts, contexts).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert in_context_rewards(["Genant Pharma"], [None]).tolist() == [0.0]
    model = lora_model(tokenizer)
    obj = setup(objective("grpo", tokenizer, context_bonus=0.5, max_new_tokens=4, check_reference=False), model)
    rollout = Rollout.__new__(Rollout)
    rollout.texts = texts[:3]
    answers = ["Genant Pharma", "Genant Pharma", "Genant Pharma"]
    assert obj.score(rollout, answers, contexts[:3]).tolist() == pytest.approx([1.5, 0.5, 0.0])
    with pytest.raises(ConfigError, match="context_bonus needs records with a context"):
        obj.score(rollout, answers, [None] * 3)
    with pytest.raises(ConfigError, match="drop it with reward: model"):
        objective("grpo", tokenizer, context_bonus=0.5, reward="model", reward_model="somewhere")
    records = [{**p, "answer": p["chosen"], "context": p["prompt"]} for p in pairs[:3]]
    scores = obj.evaluate(model, records)
    assert 0.0 <= scores["in_context"] <= 1.0 and scores["score"] == scores["exact_match"]
