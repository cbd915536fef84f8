"""Alignment losses: hand-computed checks of each equation, and parity with TRL 1.16.

How the TRL values are obtained (TRL 1.16.0, installed in the venv):

- DPO (sigmoid, ipo, hinge, robust), per-sequence log-probs and implicit rewards: TRL's own
  ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py) is called unbound on a stand-in ``self``
  (a ``SimpleNamespace`` carrying exactly the attributes it reads: beta, loss_types, label_smoothing,
  an identity ``accelerator``, a metrics dict, ...) with ``precompute_ref_logps=True``, on a real tiny
  ``LlamaForCausalLM`` patched with TRL's ``add_fused_lm_head``. The reference log-probs fed to it
  come from TRL's fused head on a second tiny model. TRL returns the batch mean, so each pair is
  run alone to get per-example values; the rewards come from its logged ``rewards/chosen`` metrics.
- KTO: ``KTOTrainer._compute_loss`` (trl/trainer/kto_trainer.py), called the same way, with its KL
  term computed by its own ``_compute_kl_logps`` on mismatched completions.
- Reward model: ``RewardTrainer.compute_loss`` (trl/trainer/reward_trainer.py) on a stand-in model
  whose "logits" are the given rewards.
- ORPO, SimPO: ``ORPOTrainer.odds_ratio_loss`` (trl/experimental/orpo) and ``CPOTrainer.cpo_loss``
  with ``loss_type="simpo"`` (trl/experimental/cpo), called unbound on a stand-in ``self``.
- GRPO advantages: computed inside the 300-line ``GRPOTrainer._generate_and_score_completions``,
  which cannot run without generation. So the formula is pinned below from
  trl/trainer/grpo_trainer.py, lines 2765-2787 of TRL 1.16.0 (``scale_rewards`` "group" / "batch" /
  "none", ``+ 1e-4``), using TRL's own ``nanstd`` for the standard deviation.
- PPO (GAE, clipped policy and value losses, the adaptive KL controller): TRL 1.16 ships no PPO
  trainer, so these are checked against hand computations only.
"""

from __future__ import annotations

import math
import os
import types
from collections import defaultdict

import pytest
import torch

from tunelab.align import losses as A

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")


def _identity_accelerator():
    return types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
    )


def _stand_in(**attributes):
    """A ``self`` for calling a TRL trainer method unbound: only the attributes it reads."""
    defaults = dict(
        accelerator=_identity_accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
    )
    return types.SimpleNamespace(**{**defaults, **attributes})


# ---- hand-computed equations ----------------------------------------------------------------------


def test_sequence_logps_by_hand_with_causal_shift():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])  # (1, T=3, V=2)
    labels = torch.tensor([[-100, 0, 1]])  # token 1 is scored by logits[0], token 2 by logits[1]
    log_p = [math.log(0.5), math.log(1 / (1 + math.e))]  # p(0 | pos 0) = 1/2, p(1 | pos 1) = 1/(1+e)
    assert A.sequence_logps(logits, labels).item() == pytest.approx(sum(log_p), rel=1e-6)
    assert A.sequence_logps(logits, labels, average=True).item() == pytest.approx(sum(log_p) / 2, rel=1e-6)
    masked = torch.tensor([[-100, -100, 1]])
    assert A.sequence_logps(logits, masked).item() == pytest.approx(log_p[1], rel=1e-6)


def test_dpo_losses_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -7.0, -4.0, -5.0))
    delta = (-3.0 + 4.0) - (-7.0 + 5.0)  # 3
    beta, eps = 0.5, 0.1

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    expected = {
        "sigmoid": -log_sigmoid(beta * delta),
        "ipo": (delta - 1 / (2 * beta)) ** 2,
        "hinge": max(0.0, 1 - beta * delta),
        "robust": (-(1 - eps) * log_sigmoid(beta * delta) + eps * log_sigmoid(-beta * delta)) / (1 - 2 * eps),
    }
    for loss_type, value in expected.items():
        losses, chosen, rejected = A.dpo_loss(
            pc,
            pr,
            rc,
            rr,
            beta=beta,
            loss_type=loss_type,
            label_smoothing=eps if loss_type == "robust" else 0.0,
        )
        assert losses.item() == pytest.approx(value, rel=1e-6), loss_type
        assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-1.0)
    smoothed, _, _ = A.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)  # cDPO
    assert smoothed.item() == pytest.approx(-(1 - eps) * log_sigmoid(1.5) - eps * log_sigmoid(-1.5), rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        A.dpo_loss(pc, pr, rc, rr, loss_type="exo")


def test_dpo_at_policy_equal_reference_is_log_two_with_zero_rewards():
    chosen, rejected = torch.randn(5) - 10, torch.randn(5) - 10
    losses, chosen_rewards, rejected_rewards = A.dpo_loss(
        chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1
    )
    assert torch.allclose(losses, torch.full((5,), math.log(2.0)))
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)
    assert not chosen_rewards.requires_grad


def test_orpo_simpo_kto_reward_by_hand():
    pc, pr = torch.tensor([-0.5]), torch.tensor([-1.5])
    odds = math.log(math.exp(-0.5) / (1 - math.exp(-0.5))) - math.log(math.exp(-1.5) / (1 - math.exp(-1.5)))
    assert A.orpo_loss(pc, pr, beta=0.2)[0].item() == pytest.approx(
        0.2 * math.log1p(math.exp(-odds)), rel=1e-6
    )
    assert A.simpo_loss(pc, pr, beta=2.0, gamma=0.5)[0].item() == pytest.approx(
        math.log1p(math.exp(-(2.0 - 0.5))), rel=1e-6
    )

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    losses, rewards = A.kto_loss(
        torch.tensor([-2.0, -3.0]),
        torch.tensor([-4.0, -1.0]),
        torch.tensor([True, False]),
        0.5,
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    assert losses.tolist() == pytest.approx(
        [1 - sigmoid(0.1 * (2.0 - 0.5)), 2 * (1 - sigmoid(0.1 * (0.5 + 2.0)))]
    )
    assert rewards.tolist() == pytest.approx([0.2, -0.2])
    assert (
        A.kto_kl_estimate(torch.tensor([-1.0, -2.0]), torch.tensor([0.0, 0.0])).item() == 0.0
    )  # clamped at 0
    loss = A.reward_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), center_rewards_coefficient=0.01)
    hand = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2 + 0.01 * (1 + 4) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second response ends after two tokens
    gamma, lam = 0.9, 0.8
    advantages, returns = A.gae(rewards, values, mask, gamma=gamma, lam=lam)
    d2 = 1.0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.1
    a1 = d1 + gamma * lam * d2
    row0 = [d0 + gamma * lam * a1, a1, d2]
    e1 = 2.0 - 0.5  # last real token: no bootstrap from the padded position
    row1 = [0.5 + gamma * 0.5 - 0.4 + gamma * lam * e1, e1, 0.0]
    assert advantages.tolist() == [pytest.approx(row0), pytest.approx(row1)]
    assert returns[0].tolist() == pytest.approx([a + v for a, v in zip(row0, [0.1, 0.2, 0.3], strict=True)])
    assert returns[1, 2].item() == 0.0


def test_ppo_policy_and_value_losses_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25]])).requires_grad_(True)  # ratios 1.5 and 0.5
    advantages = torch.tensor([[1.0, -2.0]])
    loss, stats = A.ppo_policy_loss(new, old, advantages, clip_range=0.2)
    # token 0: max(-1·1.5, -1·1.2) = -1.2 (clipped); token 1: max(2·0.5, 2·0.8) = 1.6 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 1.6) / 2, rel=1e-6)
    assert stats["clip_fraction"].item() == 1.0
    loss.backward()
    assert torch.all(new.grad == 0)  # both tokens clipped: no gradient
    masked, _ = A.ppo_policy_loss(new, old, advantages, clip_range=0.2, mask=torch.tensor([[1, 0]]))
    assert masked.item() == pytest.approx(-1.2, rel=1e-6)
    values, old_values, returns = (
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[0.0, 0.0]]),
        torch.tensor([[2.0, 1.0]]),
    )
    # token 0: max((1-2)², (0.2-2)²) = 3.24; token 1: max(1, 1) = 1
    assert A.value_loss(values, old_values, returns, clip_range_value=0.2).item() == pytest.approx(
        0.5 * (3.24 + 1) / 2
    )
    assert A.value_loss(values, old_values, returns, clip_range_value=None).item() == pytest.approx(
        0.5 * (1 + 1) / 2
    )


def test_adaptive_kl_controller_follows_ziegler():
    controller = A.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    assert controller.update(current_kl=12.0, n_steps=256) == pytest.approx(
        0.2 * (1 + 0.2 * 256 / 10000)
    )  # error clipped
    value = controller.value
    assert controller.update(current_kl=5.4, n_steps=100) == pytest.approx(value * (1 - 0.1 * 100 / 10000))
    fixed = A.AdaptiveKLController(0.05, target=None)
    assert fixed.update(100.0, 1000) == 0.05
    restored = A.AdaptiveKLController()
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


def test_kl_penalty_estimators():
    logprobs, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    r = ref - logprobs  # [-0.5, 1.0]
    assert A.kl_penalty(logprobs, ref, "k1").flatten().tolist() == pytest.approx((-r).flatten().tolist())
    assert A.kl_penalty(logprobs, ref, "k3").flatten().tolist() == pytest.approx(
        (torch.exp(r) - 1 - r).flatten().tolist()
    )
    assert torch.all(A.kl_penalty(logprobs, ref, "k3") >= 0)
    assert A.kl_penalty(logprobs, logprobs, "k3").abs().max().item() == 0.0
    # both are unbiased: over samples of π, mean k1 ≈ mean k3 ≈ KL(π ‖ π_ref)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = (p * (p / q).log()).sum().item()
    expectation = {kind: (p * A.kl_penalty(p.log(), q.log(), kind)).sum().item() for kind in ("k1", "k3")}
    assert expectation["k1"] == pytest.approx(exact, rel=1e-6) and expectation["k3"] == pytest.approx(
        exact, rel=1e-6
    )


# ---- TRL parity: DPO on a real tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def preference_batch():
    """Two tiny Llamas (policy, reference) with TRL's fused LM head, and a padded [chosen; rejected] batch."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    policy, reference = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 40, (6, 9), generator=generator)  # rows 0-2 chosen, 3-5 rejected
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[4, 7:] = 0
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 3:] = 1  # a 3-token prompt
    completion_mask[2, 3] = 0  # a longer prompt on one pair
    completion_mask *= attention_mask
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    with torch.no_grad():
        reference_per_token = reference(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True
        ).log_probs
        policy_logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits  # the plain forward
        reference_logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    return types.SimpleNamespace(
        policy=policy,
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        labels=labels,
        reference_per_token=reference_per_token,
        policy_logits=policy_logits,
        reference_logits=reference_logits,
    )


def test_sequence_logps_equal_trl_fused_head_and_get_batch_logps(preference_batch):
    from trl.experimental.orpo import ORPOTrainer

    b = preference_batch
    with torch.no_grad():
        trl_per_token = b.policy(
            input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels, fused_lm_head=True
        ).log_probs
    ours = A.sequence_logps(b.policy_logits, b.labels)
    assert torch.allclose(ours, trl_per_token.sum(1), atol=1e-5)
    assert torch.allclose(
        A.sequence_logps(b.reference_logits, b.labels), b.reference_per_token.sum(1), atol=1e-5
    )
    for average in (False, True):
        expected = ORPOTrainer.get_batch_logps(b.policy_logits, b.labels, average_log_prob=average)
        assert torch.allclose(
            A.sequence_logps(b.policy_logits, b.labels, average=average), expected, atol=1e-6
        )


def _trl_dpo(b, rows, loss_type, beta, label_smoothing, sft_weight=0.0):
    """TRL 1.16's DPOTrainer._compute_loss on the pair(s) ``rows`` (indices into the chosen half); with
    ``sft_weight`` α its RPO form, ``loss_type=[loss_type, "sft"]`` and ``loss_weights=[1, α]``."""
    from trl import DPOTrainer

    half = len(b.input_ids) // 2
    index = torch.tensor(list(rows) + [r + half for r in rows])
    reference_logps = b.reference_per_token[index].sum(1)
    stand_in = _stand_in(
        model=b.policy,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type, "sft"] if sft_weight else [loss_type],
        loss_weights=[1.0, sft_weight] if sft_weight else [1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    chosen_ref, rejected_ref = reference_logps.chunk(2)
    inputs = dict(
        input_ids=b.input_ids[index],
        attention_mask=b.attention_mask[index],
        completion_mask=b.completion_mask[index],
        ref_chosen_logps=chosen_ref,
        ref_rejected_logps=rejected_ref,
    )
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(stand_in, b.policy, inputs, False)
    metrics = stand_in._metrics["eval"]
    return loss.item(), metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


@pytest.mark.parametrize(
    "loss_type,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl_dpo_trainer(preference_batch, loss_type, beta, label_smoothing):
    b = preference_batch
    average = loss_type == "ipo"  # TRL 1.16's IPO normalises each log-ratio by the completion length
    policy = A.sequence_logps(b.policy_logits, b.labels, average=average)
    reference = A.sequence_logps(b.reference_logits, b.labels, average=average)
    (policy_chosen, policy_rejected), (reference_chosen, reference_rejected) = (
        policy.chunk(2),
        reference.chunk(2),
    )
    losses, chosen_rewards, rejected_rewards = A.dpo_loss(
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    batch_loss, _, _ = _trl_dpo(b, range(3), loss_type, beta, label_smoothing)
    assert losses.mean().item() == pytest.approx(batch_loss, abs=1e-5)
    for pair in range(3):
        loss, chosen, rejected = _trl_dpo(b, [pair], loss_type, beta, label_smoothing)
        assert losses[pair].item() == pytest.approx(loss, abs=1e-5)
        if not average:  # TRL logs rewards from summed log-probs
            assert chosen_rewards[pair].item() == pytest.approx(chosen, abs=1e-5)
            assert rejected_rewards[pair].item() == pytest.approx(rejected, abs=1e-5)


@pytest.mark.parametrize("sft_weight", [0.5, 1.0])
def test_rpo_sft_term_equals_trl_sigmoid_plus_sft(preference_batch, sft_weight):
    """DPO + α NLL(chosen) (RPO) against TRL's loss_type [sigmoid, sft] with loss_weights [1, α]: the NLL is
    the token mean over the batch's chosen completions (pairs of different lengths make the difference)."""
    b = preference_batch
    policy, reference = A.sequence_logps(b.policy_logits, b.labels), A.sequence_logps(b.reference_logits, b.labels)
    losses, _, _ = A.dpo_loss(*policy.chunk(2), *reference.chunk(2), beta=0.1)
    tokens = (b.labels[:, 1:] != -100).sum(-1)  # (2B,) scored tokens
    nll = A.chosen_nll(policy.chunk(2)[0], tokens.chunk(2)[0])
    assert tokens[:3].tolist() != [tokens[0].item()] * 3  # lengths differ: a mean of means would not match
    expected, _, _ = _trl_dpo(b, range(3), "sigmoid", 0.1, 0.0, sft_weight=sft_weight)
    assert (losses.mean() + sft_weight * nll).item() == pytest.approx(expected, abs=1e-5)
    by_hand = -policy[:3].sum() / tokens[:3].sum()
    assert nll.item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_dpo_with_the_policy_as_its_own_reference_is_log_two_in_trl_and_here(preference_batch):
    b = preference_batch
    policy = A.sequence_logps(b.policy_logits, b.labels)
    losses, chosen, rejected = A.dpo_loss(*policy.chunk(2), *policy.chunk(2))
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert chosen.abs().max().item() == 0.0 and rejected.abs().max().item() == 0.0
    b_self = types.SimpleNamespace(
        **{
            **vars(b),
            "reference_per_token": b.policy(
                input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels, fused_lm_head=True
            ).log_probs.detach(),
        }
    )
    trl_loss, trl_chosen, trl_rejected = _trl_dpo(b_self, range(3), "sigmoid", 0.1, 0.0)
    assert trl_loss == pytest.approx(math.log(2), abs=1e-6)
    assert trl_chosen == pytest.approx(0.0, abs=1e-6) and trl_rejected == pytest.approx(0.0, abs=1e-6)


# ---- TRL parity: KTO, reward, ORPO, SimPO, GRPO --------------------------------------------------


def test_kto_loss_equals_trl_kto_trainer(preference_batch):
    from trl import KTOTrainer

    b = preference_batch
    desirable = torch.tensor([True, False, True, True, False, False])
    kl_ids = b.input_ids.roll(1, dims=0)  # mismatched pairs, as KTO's KL estimate uses
    kl_attention, kl_completion = b.attention_mask.roll(1, dims=0), b.completion_mask.roll(1, dims=0)
    kl_labels = kl_ids.masked_fill(kl_completion == 0, -100)
    with torch.no_grad():
        policy_kl_logits = b.policy(input_ids=kl_ids, attention_mask=kl_attention).logits
        reference_kl_logits = b.reference_logits.roll(1, dims=0)  # same rows, same model
    reference_kl_logps = A.sequence_logps(reference_kl_logits, kl_labels) - 3.0  # shifted so the KL is > 0
    reference_logps = A.sequence_logps(b.reference_logits, b.labels)
    for beta, weights in ((0.1, (1.0, 1.0)), (0.5, (1.0, 1.5))):
        stand_in = _stand_in(
            model=b.policy,
            calculate_KL=True,
            precompute_ref_logps=True,
            loss_type="kto",
            beta=beta,
            desirable_weight=weights[0],
            undesirable_weight=weights[1],
        )
        stand_in._compute_kl_logps = lambda model, batch, s=stand_in: KTOTrainer._compute_kl_logps(
            s, model, batch
        )
        batch = dict(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            completion_mask=b.completion_mask,
            KL_input_ids=kl_ids,
            KL_attention_mask=kl_attention,
            KL_completion_mask=kl_completion,
            label=desirable,
            ref_logps=reference_logps,
            ref_KL_logps=reference_kl_logps,
        )
        with torch.no_grad():
            trl_loss = KTOTrainer._compute_loss(stand_in, b.policy, batch, False)
        kl = A.kto_kl_estimate(A.sequence_logps(policy_kl_logits, kl_labels), reference_kl_logps)
        assert kl.item() == pytest.approx(stand_in._metrics["eval"]["kl"][-1], abs=1e-5)
        assert kl.item() > 0
        losses, rewards = A.kto_loss(
            A.sequence_logps(b.policy_logits, b.labels),
            reference_logps,
            desirable,
            kl,
            beta=beta,
            desirable_weight=weights[0],
            undesirable_weight=weights[1],
        )
        assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6)
        assert rewards[desirable].mean().item() == pytest.approx(
            stand_in._metrics["eval"]["rewards/chosen"][-1], abs=1e-5
        )
        assert rewards[~desirable].mean().item() == pytest.approx(
            stand_in._metrics["eval"]["rewards/rejected"][-1], abs=1e-5
        )


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_equals_trl_reward_trainer(with_margin, center):
    from trl import RewardTrainer

    generator = torch.Generator().manual_seed(3)
    chosen, rejected = torch.randn(5, generator=generator), torch.randn(5, generator=generator)
    margin = torch.rand(5, generator=generator) if with_margin else None
    model = lambda **inputs: types.SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])  # noqa: E731
    stand_in = _stand_in(
        model=types.SimpleNamespace(training=False),
        args=types.SimpleNamespace(center_rewards_coefficient=center),
    )
    inputs = {
        "input_ids": torch.zeros(10, 2, dtype=torch.long),
        "attention_mask": torch.ones(10, 2, dtype=torch.long),
    }
    if with_margin:
        inputs["margin"] = margin
    expected = RewardTrainer.compute_loss(stand_in, model, inputs)
    ours = A.reward_loss(chosen, rejected, margin=margin, center_rewards_coefficient=center)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-7)


def test_orpo_and_simpo_equal_trl():
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    generator = torch.Generator().manual_seed(4)
    chosen = -torch.rand(6, generator=generator) * 3  # mean-token log-probs, some each side of −log 2
    rejected = -torch.rand(6, generator=generator) * 3
    for beta in (0.1, 0.25):
        stand_in = _stand_in(beta=beta)
        trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(stand_in, chosen, rejected)
        losses, chosen_rewards, rejected_rewards = A.orpo_loss(chosen, rejected, beta=beta)
        assert torch.allclose(
            losses, -trl_losses, atol=1e-7
        )  # TRL returns the term it subtracts from the NLL
        assert torch.allclose(chosen_rewards, trl_chosen) and torch.allclose(rejected_rewards, trl_rejected)
    for beta, gamma, smoothing in ((2.0, 0.5, 0.0), (2.5, 1.0, 0.1)):
        stand_in = _stand_in(
            beta=beta, simpo_gamma=gamma, label_smoothing=smoothing, loss_type="simpo", alpha=0.0
        )
        trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(stand_in, chosen, rejected)
        losses, chosen_rewards, rejected_rewards = A.simpo_loss(
            chosen, rejected, beta=beta, gamma=gamma, label_smoothing=smoothing
        )
        assert torch.allclose(losses, trl_losses, atol=1e-6)
        assert torch.allclose(chosen_rewards, trl_chosen) and torch.allclose(rejected_rewards, trl_rejected)


def _trl_grpo_advantages(rewards, num_generations, scale_rewards):
    """Pinned from trl/trainer/grpo_trainer.py, TRL 1.16.0, lines 2765-2787 (sum_then_normalize, one reward function)."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:  # "batch"
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_advantages_equal_trl_formula(scale_rewards):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.2, 3.0, -1.0, 0.5, 0.0])  # 3 prompts × 4
    expected = _trl_grpo_advantages(rewards, 4, scale_rewards)
    ours = A.grpo_advantages(rewards, group_size=4, scale_rewards=scale_rewards)
    assert torch.allclose(ours, expected, atol=1e-6)
    if scale_rewards == "group":
        assert torch.all(ours[4:8] == 0)  # an all-equal group carries no signal
        std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased: √(1/3)
        assert ours[0].item() == pytest.approx(0.5 / (std + 1e-4), rel=1e-6)
