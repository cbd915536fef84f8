"""``grpo`` and ``ppo``: generate-then-update RL on the shared training loop, any tunelab method as policy.

Each optimizer step's ``loss()`` (1) samples completions for the batch's prompts from the policy,
(2) scores them — the programmatic ground-truth reward (``reward: exact_match``, or its token F1,
``reward: token_f1``, against the built-in world's
known answers; ``context_bonus: b`` adds b when the answer is a span of the record's context, the
extractive constraint, so that copying some span beats inventing a value) or a trained reward model
(``reward: model``, ``reward_model: <dir>``), (3) returns the loss. A rollout is reused for ``num_iterations`` consecutive steps (TRL's ``num_iterations`` /
PPO's epochs), which is when the clipped ratio π/π_old departs from 1 and clipping matters.

GRPO (Shao et al. 2024, arXiv:2402.03300), G completions per prompt and no value model:

    A_i = (r_i − mean(r_group)) / (std(r_group) + ε)
    L = mean_t max(−A ρ_t, −A clip(ρ_t, 1 ± ε_c)) + β mean_t k3(π, π_ref)_t,   ρ_t = π(y_t)/π_old(y_t)

PPO (Schulman et al. 2017, arXiv:1707.06347; RLHF form of Ziegler et al. 2019, arXiv:1909.08593),
with a value head V (a per-token scalar head on the policy's last hidden state, returned from
``modules()``):

    r_t = −β_KL (log π_old(y_t) − log π_ref(y_t)) + [t = last] · score
    (A_t, R_t) = GAE(r, V_old; γ, λ),  A whitened
    L = clipped surrogate(A) + c_v · ½ max((V − R)², (V_clip − R)²)

and β_KL follows the adaptive controller (:class:`~tunelab.align.rl.AdaptiveKLController`). The maths
are the tested functions of :mod:`tunelab.align.rl`; the reference is
:class:`~tunelab.align.reference.Reference` (checked at the first rollout: KL must be 0).
Under ``torch.no_grad`` (the loop's eval loss) ``loss()`` decodes greedily and returns −mean reward.
``evaluate`` gives the greedy exact match (or mean reward-model score) on held-out prompts and, with
a reference, ``kl_ref``: the held-out KL(π ‖ π_ref) on the policy's samples that ``dpo`` and ``kto``
report too (:mod:`tunelab.align.kl`), so all of them land on one reward-vs-KL frontier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.align.data import PromptCollator, reference_answer
from tunelab.align.dpo import ReferenceOptions
from tunelab.align.reference import Reference, StageDropout
from tunelab.align.rl import (
    AdaptiveKLController,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    value_loss,
)
from tunelab.align.rollout import (
    Rollout,
    exact_match_rewards,
    in_context_rewards,
    sample,
    token_f1_rewards,
    token_logps,
)
from tunelab.errors import ConfigError
from tunelab.models.heads import TaskHeads
from tunelab.train.objective import BaseObjective, LossOutput
from tunelab.utils import data_parallel_size, ranks_mean, unwrap_model


class OnlineOptions(ReferenceOptions):
    """Options shared by ``grpo`` and ``ppo``."""

    reward: Literal["exact_match", "token_f1", "model"] = Field(
        "exact_match", description="exact_match: 1 when the completion equals the record's known answer (built-in "
        "world); token_f1: its token F1 with that answer (partial credit, a denser signal); model: a trained "
        "reward model from reward_model.")
    context_bonus: float = Field(0.0, ge=0, description="b > 0 adds b to the reward of a completion whose answer is a "
        "span of the record's context (extractive QA: copying from the context instead of inventing a value), "
        "on top of exact_match / token_f1. Shaping: the evaluation's score stays the exact match.")
    reward_model: str | None = Field(None, description="Directory written by the reward objective's save_dir.")
    reward_model_base: str | None = Field(None, description="Base model of the reward model, if not the saved one.")
    max_new_tokens: int = Field(24, gt=0, description="Completion budget per rollout.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of rollouts (0 = greedy).")
    num_iterations: int = Field(1, ge=1, description="Optimizer steps per rollout (PPO epochs); >1 makes clipping bite.")
    clip_range: float = Field(0.2, gt=0, description="ε of the clipped surrogate.")
    eval_samples: int = Field(0, ge=0, description="k > 0: the evaluation also samples k completions per held-out "
        "prompt at the rollout temperature and reports sampled_exact_match (the expected reward of a sample), "
        "pass_at_k and reachable (the share of greedily-wrong prompts with a correct sample: the answers a "
        "ground-truth reward can ever reinforce). Programmatic rewards only.")


class _OnlineObjective(BaseObjective):
    model_task = "causal_lm"
    name = "online"

    def __init__(self, config: OnlineOptions | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        if self.config.reference == "precomputed":
            raise ConfigError(f"{self.name}: reference precomputed does not apply to fresh rollouts; "
                              "use base or sft_adapter")
        if self.config.reward == "model" and self.config.context_bonus:
            raise ConfigError(f"{self.name}: context_bonus shapes a programmatic reward; drop it with reward: model")
        if self.config.reward == "model" and not self.config.reward_model:
            raise ConfigError(f"{self.name}: reward: model needs reward_model: <directory of a trained reward model>")
        self.reference = Reference(self.config.reference, self.config.reference_tolerance, self.config.check_reference)
        self.dropout = StageDropout()
        self.scorer: Any = None
        self.buffer: dict[str, Any] | None = None
        self.uses = 0

    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 256,
                      template: str = "plain", **_: Any) -> Callable:
        self.template = template
        return PromptCollator(tokenizer, max_length=max_length, template=template)

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        super().setup(model, accelerator)
        if self.config.disable_dropout:
            self.dropout.off(model)  # for this stage only: on_stage_end restores it
        if self.reference.mode != "none":
            self.reference.setup(model)
        if self.config.reward == "model" and self.scorer is None:
            from tunelab.align.reward import RewardModel

            self.scorer = RewardModel.load(self.config.reward_model, base=self.config.reward_model_base)

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        self.dropout.restore()  # disable_dropout is this stage's: later stages and the evaluation get it back

    # --- rollouts
    def score(self, rollout: Rollout, answers: Sequence[str | None],
              contexts: Sequence[str | None] | None = None) -> torch.Tensor:
        """(N,) rewards of the rollout's completions: the reward model's, or the programmatic reward plus
        ``context_bonus`` × [the answer is a span of the context] (``contexts``: one per completion)."""
        if self.scorer is not None:
            if getattr(self.scorer, "needs_completion_mask", False):  # a reward model with pooling: completion
                return self.scorer.score(rollout.sequences, rollout.attention_mask, rollout.completion_mask).cpu()
            return self.scorer.score(rollout.sequences, rollout.attention_mask).cpu()
        reward = (token_f1_rewards if self.config.reward == "token_f1" else exact_match_rewards)(rollout.texts, answers)
        if self.config.context_bonus:
            if contexts is None or all(c is None for c in contexts):
                raise ConfigError(f"{self.name}: context_bonus needs records with a context (extractive QA); "
                                  "set context_bonus: 0 for these data")
            reward = reward + self.config.context_bonus * in_context_rewards(rollout.texts, contexts)
        return reward

    def rollout(self, model: nn.Module, batch: dict[str, Any], generations: int, temperature: float) -> Rollout:
        # sampling is rank-local (each process decodes its own prompts for as many steps as they need): the
        # model itself, not the DDP wrapper, whose forwards are meant for the synchronised training step
        return sample(unwrap_model(model), self.tokenizer, batch["prompts"], num_generations=generations,
                      max_new_tokens=self.config.max_new_tokens, temperature=temperature)

    def reference_logps(self, model: nn.Module, rollout: Rollout, policy: torch.Tensor) -> torch.Tensor:
        reference = self.reference.logps(model, {}, lambda m, _: token_logps(m, rollout)[0])  # (N, S)
        if model.training:
            self.reference.check(self.name, (policy.detach() - reference).sum(-1))
        return reference

    def current_rollout(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The rollout this step trains on: a fresh one every ``num_iterations`` steps, else the last."""
        if self.buffer is None or self.uses >= self.config.num_iterations:
            self.buffer, self.uses = self.new_rollout(model, batch), 0
        self.uses += 1
        return self.buffer

    def eval_loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        rollout = self.rollout(model, batch, 1, 0.0)
        reward = self.score(rollout, batch["answers"], batch.get("contexts"))
        return LossOutput(-reward.mean().to(next(model.parameters()).device), {"reward": float(reward.mean())})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, records: Sequence[Any], batch_size: int = 16,
                 max_new_tokens: int | None = None, **_: Any) -> dict[str, float]:
        """Greedy completions of held-out prompts: mean reward (= exact match with ``exact_match``); with a
        reference, ``kl_ref`` — the held-out KL(π ‖ π_ref) that ``dpo`` / ``kto`` report too
        (:mod:`tunelab.align.kl`), over ``max_new_tokens`` (the eval section's; else the rollouts') tokens."""
        rewards, matches, prompts, sampled, inside = [], [], [], [], []
        k = self.config.eval_samples if self.scorer is None else 0
        for start in range(0, len(records), batch_size):
            chunk = list(records[start : start + batch_size])
            batch = self.collate_fn(chunk)
            prompts += batch["prompts"]
            rollout = self.rollout(model, batch, 1, 0.0)
            if self.scorer is not None:
                rewards += self.score(rollout, batch["answers"]).tolist()
            elif self.config.reward == "token_f1":
                rewards += token_f1_rewards(rollout.texts, batch["answers"]).tolist()
            matches += exact_match_rewards(rollout.texts, batch["answers"]).tolist()
            if any(c is not None for c in batch.get("contexts", [])):
                inside += in_context_rewards(rollout.texts, batch["contexts"]).tolist()
            if k:
                many = self.rollout(model, batch, k, self.config.temperature or 1.0)
                answers = [a for a in batch["answers"] for _ in range(k)]
                sampled += exact_match_rewards(many.texts, answers).view(-1, k).tolist()  # (prompts, k)
        if self.scorer is not None:
            mean = sum(rewards) / len(rewards)
            result = {"reward": mean, "score": mean}
        else:  # a programmatic reward: greedy exact match is the score either way (the frontier's axis)
            exact = sum(matches) / len(matches)
            result = {"exact_match": exact, "score": exact}
            if self.config.reward == "token_f1":
                result["token_f1"] = sum(rewards) / len(rewards)
            if inside:  # extractive QA: how often the greedy answer is copied from the context at all
                result["in_context"] = sum(inside) / len(inside)
            if k:
                result.update(sample_diagnostics(matches, sampled))
        if self.config.eval_kl and self.reference.ready:
            from tunelab.align.kl import heldout_kl

            result.update(heldout_kl(unwrap_model(model), self.tokenizer, prompts, self.reference,
                                     max_new_tokens=max_new_tokens or self.config.max_new_tokens,
                                     batch_size=batch_size))
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference.load_state_dict(state.get("reference", {}))


class GRPOOptions(OnlineOptions):
    """Options of the ``grpo`` objective (TRL's names)."""

    num_generations: int = Field(4, ge=2, description="G: completions per prompt, the group of the advantage.")
    beta: float = Field(0.04, ge=0, description="Weight of the k3 KL to the reference (0 = no reference needed).")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Advantage scaling; none = Dr. GRPO.")


class GRPOObjective(_OnlineObjective):
    """``grpo``: group-normalised advantages over G sampled completions per prompt, no value model."""

    config_class = GRPOOptions
    name = "grpo"

    def __init__(self, config: GRPOOptions | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        if self.config.beta == 0:  # no KL term: no reference at all
            self.reference = Reference("none")

    def new_rollout(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        rollout = self.rollout(model, batch, config.num_generations, config.temperature)
        answers = [a for a in batch["answers"] for _ in range(config.num_generations)]
        contexts = [c for c in batch.get("contexts", [None] * len(batch["answers"])) for _ in range(config.num_generations)]
        rewards = self.score(rollout, answers, contexts)  # (N,)
        device = next(model.parameters()).device
        advantages = grpo_advantages(rewards, config.num_generations, config.scale_rewards).to(device)
        buffer = {"rollout": rollout, "rewards": rewards, "advantages": advantages, "old": None, "ref": None}
        if config.num_iterations > 1 or config.beta > 0:
            with torch.no_grad():
                old = token_logps(model, rollout)[0]
            buffer["old"] = old
            if config.beta > 0:
                buffer["ref"] = self.reference_logps(model, rollout, old)
        return buffer

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        if not torch.is_grad_enabled():
            return self.eval_loss(model, batch)
        buffer = self.current_rollout(model, batch)
        rollout = buffer["rollout"]
        mask = rollout.completion_mask
        logps, _ = token_logps(model, rollout)  # (N, S) with grad
        old = buffer["old"] if buffer["old"] is not None else logps.detach()
        loss, stats = ppo_policy_loss(logps, old, buffer["advantages"], self.config.clip_range, mask)
        metrics = {"reward": float(buffer["rewards"].mean()),
                   "reward_std": float(buffer["rewards"].view(-1, self.config.num_generations).std(1).mean()),
                   "clip_fraction": float(stats["clip_fraction"]),
                   "completion_length": float(mask.sum(-1).float().mean())}
        if buffer["ref"] is not None:
            kl = masked_mean(kl_penalty(logps, buffer["ref"], "k3"), mask)
            loss = loss + self.config.beta * kl
            metrics["kl"] = float(kl.detach())
        return LossOutput(loss, metrics)


class PPOOptions(OnlineOptions):
    """Options of the ``ppo`` objective (TRL's classic PPO names and defaults)."""

    init_kl_coef: float = Field(0.2, ge=0, description="β_KL at the start.")
    target_kl: float | None = Field(6.0, gt=0, description="Adaptive controller's KL target (None = fixed β_KL).")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive controller's horizon.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="λ of GAE.")
    vf_coef: float = Field(0.1, ge=0, description="c_v: weight of the value loss.")
    clip_range_value: float | None = Field(0.2, gt=0, description="ε_v of value clipping (None = plain MSE).")
    whiten_advantages: bool = Field(True, description="Normalise advantages to zero mean, unit std per rollout.")


class PPOObjective(_OnlineObjective):
    """``ppo``: clipped surrogate + clipped value loss, per-token KL penalty with an adaptive coefficient."""

    config_class = PPOOptions
    name = "ppo"

    def __init__(self, config: PPOOptions | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        if self.reference.mode == "none":
            raise ConfigError("ppo: the KL penalty needs a reference (base or sft_adapter)")
        self.kl_controller = AdaptiveKLController(self.config.init_kl_coef, self.config.target_kl,
                                                  self.config.kl_horizon)
        self.heads: TaskHeads | None = None

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        if self.heads is None:
            self.heads = TaskHeads.for_model(model)
            self.heads.add_head("value", "scalar", pooling="none")
        super().setup(model, accelerator)

    def modules(self) -> list[nn.Module]:
        return [self.heads] if self.heads is not None else []

    def policy(self, model: nn.Module, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, values), each (N, S) over the completion tokens."""
        logps, hidden = token_logps(model, rollout, hidden=True)
        values = self.heads.heads["value"](hidden, rollout.completion_mask).float()  # (N, S)
        return logps, values * rollout.completion_mask

    def new_rollout(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        rollout = self.rollout(model, batch, 1, config.temperature)
        scores = self.score(rollout, batch["answers"], batch.get("contexts"))  # (N,)
        mask = rollout.completion_mask
        with torch.no_grad():
            old, old_values = self.policy(model, rollout)
            ref = self.reference_logps(model, rollout, old)
        kl = (old - ref) * mask  # (N, S) k1 per token
        rewards = -self.kl_controller.value * kl
        last = (mask.sum(-1) - 1).clamp(min=0)  # (N,) index of the last real token
        rewards[torch.arange(len(last)), last] += scores.to(rewards.device)
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            mean = masked_mean(advantages, mask)
            std = masked_mean((advantages - mean) ** 2, mask).sqrt()
            advantages = (advantages - mean) / (std + 1e-8) * mask
        # β_KL adapts to the KL of the whole (global) batch, as TRL's PPO gathers it over processes: every
        # rank keeps the same coefficient (the objective's state, saved by rank 0)
        sequence_kl = float(ranks_mean(kl.sum(-1).mean(), model))
        self.kl_controller.update(sequence_kl, len(scores) * data_parallel_size(model))
        return {"rollout": rollout, "scores": scores, "old": old, "old_values": old_values,
                "advantages": advantages, "returns": returns, "kl": sequence_kl}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        if not torch.is_grad_enabled():
            return self.eval_loss(model, batch)
        buffer, config = self.current_rollout(model, batch), self.config
        mask = buffer["rollout"].completion_mask
        logps, values = self.policy(model, buffer["rollout"])
        pg_loss, stats = ppo_policy_loss(logps, buffer["old"], buffer["advantages"], config.clip_range, mask)
        vf_loss = value_loss(values, buffer["old_values"], buffer["returns"], config.clip_range_value, mask)
        return LossOutput(pg_loss + config.vf_coef * vf_loss, {
            "reward": float(buffer["scores"].mean()), "kl": buffer["kl"], "kl_coef": self.kl_controller.value,
            "policy_loss": float(pg_loss.detach()), "value_loss": float(vf_loss.detach()),
            "clip_fraction": float(stats["clip_fraction"]), "completion_length": float(mask.sum(-1).float().mean()),
        })

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kl_controller": self.kl_controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])


def sample_diagnostics(greedy: Sequence[float], sampled: Sequence[Sequence[float]]) -> dict[str, float]:
    """What sampling can reach, from greedy exact match per prompt and k sampled exact matches per prompt.

    ``sampled_exact_match`` = mean over prompts and samples (the expected reward of one sample, the
    quantity GRPO / PPO maximise); ``pass_at_k`` = share of prompts with at least one correct sample;
    ``reachable`` = among prompts the greedy answer gets wrong, the share with a correct sample. A
    ground-truth reward only reinforces answers that are sampled, so when ``reachable`` is near 0 RL can
    sharpen what the policy already answers right but cannot raise greedy exact match.
    """
    hits = [sum(row) for row in sampled]
    wrong = [h for g, h in zip(greedy, hits, strict=True) if g < 1]
    samples = sum(len(row) for row in sampled)
    return {"sampled_exact_match": sum(hits) / max(samples, 1),
            "pass_at_k": sum(h > 0 for h in hits) / max(len(hits), 1),
            "reachable": sum(h > 0 for h in wrong) / len(wrong) if wrong else 1.0}


def answers_of(records: Sequence[dict]) -> list[str]:
    """The known answers of records (for scripts that score generations themselves)."""
    return [reference_answer(r) for r in records]
