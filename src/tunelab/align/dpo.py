"""``dpo``: Direct Preference Optimization and its variants on any tunelab method, as an objective.

DPO (Rafailov et al. 2023, arXiv:2305.18290) fits the policy to preference pairs (x, y_w, y_l)
without a reward model: the implicit reward of a completion is r(x, y) = β log π_θ(y|x)/π_ref(y|x),
and the loss is a function of the margin Δ = (r_w − r_l)/β:

    sigmoid  −log σ(βΔ)                (DPO; cDPO with label_smoothing ε)
    ipo      (Δ − 1/(2β))²              (Azar et al. 2023; length-averaged log-probs, as TRL 1.16)
    hinge    max(0, 1 − βΔ)             (SLiC, Zhao et al. 2023)
    robust   rDPO, unbiased under label noise ε (Chowdhury et al. 2024)
    orpo     NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l))     (Hong et al. 2024; no reference)
    simpo    −log σ(β (mean log π(y_w) − mean log π(y_l)) − γ)      (Meng et al. 2024; no reference)

and with ``sft_weight`` α > 0 any of them but ORPO gets + α · NLL(y_w), the chosen completions' NLL per
token (RPO, Pang et al. 2024: DPO's margin can grow while the chosen answers' likelihood falls too).

ORPO and SimPO are ``loss_type``s of this objective rather than objectives of their own: they take
the same pairs, the same collator, the same metrics and evaluation, and differ only in the loss and
in having no reference (``reference`` becomes ``none`` for them; asking for another is an error).

How the code maps to it: one forward of the 2B concatenated rows gives the policy's summed and
mean-token log-probs (:func:`~tunelab.align.logps.pair_logps`); the reference
(:class:`~tunelab.align.reference.Reference`: ``base`` = adapter disabled, ``sft_adapter`` = a frozen
copy of the trainable tensors, ``precomputed`` = cached per record) gives the same table without
gradient; the loss is :func:`tunelab.align.losses.dpo_loss` (TRL-parity tested). At the first step the
log-ratios must be 0 (the reference check), and every step logs TRL's metric names:
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected`` and ``kl`` (the mean log π − log π_ref over both completions).
``evaluate`` adds ``kl_ref``, the held-out KL(π ‖ π_ref) on the policy's own samples
(:mod:`tunelab.align.kl`), which PPO and GRPO report too: the reward-vs-KL frontier's x axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from tunelab.align.data import PairCollator
from tunelab.align.logps import (
    CHOSEN_MEAN,
    CHOSEN_SUM,
    REJECTED_MEAN,
    REJECTED_SUM,
    evaluate_preferences,
    pair_logps,
)
from tunelab.align.losses import IGNORE_INDEX, chosen_nll, dpo_loss, orpo_loss, simpo_loss
from tunelab.align.reference import Reference, ReferenceMode, StageDropout
from tunelab.train.objective import BaseObjective, LossOutput, ObjectiveConfig

REFERENCE_FREE = ("orpo", "simpo")


class ReferenceOptions(ObjectiveConfig):
    """Options every reference-based alignment objective shares."""

    reference: ReferenceMode = Field("base", description="π_ref: base (adapters disabled, no copy), sft_adapter "
                                     "(frozen copy of the trainable tensors at setup), precomputed (cached per "
                                     "record before training), none (reference-free losses only).")
    check_reference: bool = Field(True, description="Stop at step 0 when log π − log π_ref is not ~0 (a wrong reference).")
    reference_tolerance: float = Field(1e-3, gt=0, description="Largest |log π − log π_ref| (nats per sequence) "
                                       "accepted at step 0; float32 noise is ~1e-5.")
    disable_dropout: bool = Field(True, description="Zero every dropout (TRL's default): the policy must equal the "
                                  "reference at step 0, and dropout noise would bias the log-ratios.")
    eval_kl: bool = Field(True, description="Evaluate kl_ref: the mean over held-out prompts of the summed per-token "
                          "KL(π ‖ π_ref) along one completion sampled from the policy (nats; the x axis of the "
                          "report's reward-vs-KL frontier). Needs a reference.")


class DPOOptions(ReferenceOptions):
    """Options of the ``dpo`` objective."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "orpo", "simpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO); orpo, simpo are reference-free.")
    beta: float = Field(0.1, gt=0, description="β: strength of the implicit KL to the reference (IPO's τ, ORPO's λ, "
                        "SimPO's reward scale — use ~2 there). 0.1 is TRL's default.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε, assumed rate of flipped labels (sigmoid, robust, simpo).")
    simpo_gamma: float = Field(0.5, description="SimPO's target margin γ (absolute).")
    sft_weight: float = Field(0.0, ge=0, description="α of RPO (Pang et al. 2024): adds α × the NLL of the chosen "
                              "completions (token mean over the batch) so their likelihood does not fall with the "
                              "rejected ones'. TRL: loss_type [sigmoid, sft], loss_weights [1, α]. 0 = off; the "
                              "paper uses 1.")
    eval_generation: bool = Field(True, description="Evaluate greedy generations against the chosen answer "
                                  "(meaningful when chosen is the known answer, as in the built-in world).")

    @model_validator(mode="after")
    def _reference_fits_loss(self) -> DPOOptions:
        if self.sft_weight and self.loss_type == "orpo":
            raise ValueError("loss_type orpo already includes the chosen NLL; remove sft_weight")
        if self.loss_type in REFERENCE_FREE:
            if "reference" in self.model_fields_set and self.reference != "none":
                raise ValueError(f"loss_type {self.loss_type} is reference-free; remove reference or set it to none")
            self.reference = "none"
        elif self.reference == "none":
            raise ValueError(f"loss_type {self.loss_type} needs a reference (base, sft_adapter or precomputed)")
        return self


class DPOObjective(BaseObjective):
    """``dpo``: preference pairs -> DPO-family loss against an explicit, checked reference."""

    config_class = DPOOptions
    model_task = "causal_lm"
    name = "dpo"

    def __init__(self, config: DPOOptions | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.reference = Reference(self.config.reference, self.config.reference_tolerance, self.config.check_reference)
        self.dropout = StageDropout()
        self.template = "plain"
        self.model: nn.Module | None = None

    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 256,
                      template: str = "plain", **_: Any) -> Callable:
        self.template = template
        return PairCollator(tokenizer, max_length=max_length, template=template)

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        super().setup(model, accelerator)
        if self.config.disable_dropout:
            self.dropout.off(model)  # for this stage only: on_stage_end restores it
        self.model = model
        if self.reference.mode != "none":
            self.reference.setup(model)

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        self.dropout.restore()  # disable_dropout is this stage's: later stages and the evaluation get it back

    def sampler(self, records: Sequence[Any], config: Any, rank: int = 0, world_size: int = 1) -> Any:
        """``precomputed``: fill the reference cache for every training record before the first step."""
        if self.reference.mode == "precomputed" and self.model is not None and self.collate_fn is not None:
            self.reference.precompute(self.model, records, self.collate_fn, pair_logps,
                                      batch_size=getattr(config, "batch_size", 8))
        return None

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        config = self.config
        # the reference first: sft_adapter swaps tensors in place, which must not touch a live graph
        reference = self.reference.logps(model, batch, pair_logps) if config.loss_type not in REFERENCE_FREE else None
        policy = pair_logps(model, batch)  # (B, 4) with grad
        if reference is None:
            chosen, rejected = policy[:, CHOSEN_MEAN], policy[:, REJECTED_MEAN]
            if config.loss_type == "orpo":
                losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, beta=config.beta)
                losses = losses - chosen  # + NLL of the chosen completion (mean over its tokens)
            else:
                losses, chosen_rewards, rejected_rewards = simpo_loss(
                    chosen, rejected, beta=config.beta, gamma=config.simpo_gamma, label_smoothing=config.label_smoothing)
            metrics = {}
        else:
            if model.training:
                self.reference.check("dpo", (policy - reference)[:, :2])
            columns = [CHOSEN_MEAN, REJECTED_MEAN] if config.loss_type == "ipo" else [CHOSEN_SUM, REJECTED_SUM]
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy[:, columns[0]], policy[:, columns[1]], reference[:, columns[0]], reference[:, columns[1]],
                beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing)
            kl = (policy.detach() - reference)[:, :2].mean()
            metrics = {"kl": float(kl)}
        loss = losses.mean()
        if config.sft_weight:  # RPO: + α NLL(y_w), the token mean over the batch's chosen completions
            nll = chosen_nll(policy[:, CHOSEN_SUM], (batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum(-1))
            loss = loss + config.sft_weight * nll
            metrics["nll"] = float(nll.detach())
        return LossOutput(loss, {
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
            "logps/chosen": float(policy[:, CHOSEN_SUM].detach().mean()),
            "logps/rejected": float(policy[:, REJECTED_SUM].detach().mean()),
            **metrics,
        })

    def evaluate(self, model: nn.Module, records: Sequence[Any], max_new_tokens: int = 32, batch_size: int = 16,
                 progress: bool = False, **_: Any) -> dict[str, float]:
        return evaluate_preferences(
            model, self.tokenizer, records, self.collate_fn, reference=self._eval_reference(model),
            template=self.template, generate=self.config.eval_generation, max_new_tokens=max_new_tokens,
            batch_size=batch_size, progress=progress, kl=self.config.eval_kl)

    def _eval_reference(self, model: nn.Module) -> Reference | None:
        """The training reference when it is set up (after ``setup``); None before or when there is none."""
        return self.reference if self.reference.ready else None

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference.load_state_dict(state.get("reference", {}))
