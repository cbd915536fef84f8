"""``kto``: Kahneman–Tversky Optimization from unpaired desirable / undesirable completions.

KTO (Ethayarajh et al. 2024, arXiv:2402.01306) needs only a thumbs-up or thumbs-down per completion.
With the implicit reward r = log π_θ(y|x) − log π_ref(y|x) and the reference point z₀ (a batch
estimate of KL(π_θ ‖ π_ref), detached, clamped at 0):

    desirable:    λ_D (1 − σ(β (r − z₀)))
    undesirable:  λ_U (1 − σ(β (z₀ − r)))

z₀ is estimated on *mismatched* pairs: prompt i with the completion of row i − 1, so it measures how
far the policy drifts on text it did not condition on (TRL does the same).

How the code maps to it: :class:`~tunelab.align.data.UnpairedCollator` turns unpaired records
(``prompt``/``completion``/``label``) — or preference pairs, split into a desirable and an undesirable
example — into the matched rows and the mismatched ``kl_*`` rows; one forward of the matched rows with
gradient and one of the mismatched rows without give the policy's summed log-probs, the reference
(:class:`~tunelab.align.reference.Reference`) gives both without gradient, then
:func:`~tunelab.align.losses.kto_kl_estimate` and :func:`~tunelab.align.losses.kto_loss` (TRL-parity
tested). Evaluation on preference pairs is the ``dpo`` objective's (preference accuracy, greedy
exact match, the held-out ``kl_ref`` of :mod:`tunelab.align.kl`); on unpaired records, the mean
implicit reward per label and ``kl_ref`` on their distinct prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tunelab.align.data import PairCollator, UnpairedCollator
from tunelab.align.dpo import ReferenceOptions
from tunelab.align.logps import completion_logps, evaluate_preferences
from tunelab.align.losses import kto_kl_estimate, kto_loss
from tunelab.align.reference import Reference, StageDropout
from tunelab.errors import ConfigError
from tunelab.train.objective import BaseObjective, LossOutput
from tunelab.utils import is_data_parallel, ranks_mean


class KTOOptions(ReferenceOptions):
    """Options of the ``kto`` objective."""

    beta: float = Field(0.1, gt=0, description="β of the KTO value function; TRL's default.")
    desirable_weight: float = Field(1.0, gt=0, description="λ_D; raise it when desirable examples are rarer.")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U; the paper keeps λ_D n_D / (λ_U n_U) in [1, 4/3].")
    eval_generation: bool = Field(True, description="Evaluate greedy generations against the chosen answer of "
                                  "held-out preference pairs.")


def unpaired_logps(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(B', 2): summed log-prob of each completion and of its mismatched (KL) completion.

    The KL column is computed without gradient, as TRL does: z₀ is a constant of the loss.
    """
    matched = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[:, 0]
    with torch.no_grad():
        mismatched = completion_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])[:, 0]
    return torch.stack([matched, mismatched], dim=-1)


class KTOObjective(BaseObjective):
    """``kto``: unpaired (or split preference) examples -> KTO loss against an explicit, checked reference."""

    config_class = KTOOptions
    model_task = "causal_lm"

    def __init__(self, config: KTOOptions | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        if self.config.reference == "none":
            raise ConfigError("objective kto needs a reference (base, sft_adapter or precomputed), not none")
        self.reference = Reference(self.config.reference, self.config.reference_tolerance, self.config.check_reference)
        self.dropout = StageDropout()
        self.template = "plain"
        self.model: nn.Module | None = None
        self.pair_collate: Callable | None = None

    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 256,
                      template: str = "plain", **_: Any) -> Callable:
        self.template = template
        self.pair_collate = PairCollator(tokenizer, max_length=max_length, template=template)
        return UnpairedCollator(tokenizer, max_length=max_length, template=template)

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        super().setup(model, accelerator)
        if self.config.disable_dropout:
            self.dropout.off(model)  # for this stage only: on_stage_end restores it
        self.model = model
        self.reference.setup(model)

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        self.dropout.restore()  # disable_dropout is this stage's: later stages and the evaluation get it back

    def sampler(self, records: Sequence[Any], config: Any, rank: int = 0, world_size: int = 1) -> Any:
        if self.reference.mode == "precomputed" and self.model is not None and self.collate_fn is not None:
            self.reference.precompute(self.model, records, self.collate_fn, unpaired_logps,
                                      batch_size=getattr(config, "batch_size", 8))
        return None

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        reference = self.reference.logps(model, batch, unpaired_logps)  # (B', 2); first, before any graph
        policy = unpaired_logps(model, batch)  # (B', 2): column 0 with grad
        if model.training:
            self.reference.check("kto", policy.detach() - reference)
        if is_data_parallel(model):  # z₀ over the global batch: the per-process means averaged, then clamped,
            # as TRL gathers the KL over processes (each process still pairs its own rows as mismatched ones)
            kl = ranks_mean((policy[:, 1] - reference[:, 1]).mean(), model).clamp_min(0)
        else:
            kl = kto_kl_estimate(policy[:, 1], reference[:, 1])
        desirable = batch["desirable"]
        losses, rewards = kto_loss(policy[:, 0], reference[:, 0], desirable, kl, beta=self.config.beta,
                                   desirable_weight=self.config.desirable_weight,
                                   undesirable_weight=self.config.undesirable_weight)
        chosen, rejected = rewards[desirable], rewards[~desirable]
        metrics = {"kl": float(kl)}
        if len(chosen):
            metrics["rewards/chosen"] = float(chosen.mean())
        if len(rejected):
            metrics["rewards/rejected"] = float(rejected.mean())
        if len(chosen) and len(rejected):
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return LossOutput(losses.mean(), metrics)

    def evaluate(self, model: nn.Module, records: Sequence[Any], max_new_tokens: int = 32, batch_size: int = 16,
                 progress: bool = False, **_: Any) -> dict[str, float]:
        """Preference metrics on held-out pairs (unpaired test records: the mean implicit reward by label)."""
        if records and all("chosen" in r and "rejected" in r for r in records):
            return evaluate_preferences(model, self.tokenizer, records, self.pair_collate,
                                        reference=self.reference if self.reference.ready else None,
                                        template=self.template, generate=self.config.eval_generation,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                        kl=self.config.eval_kl)
        result = self._unpaired_eval(model, records, batch_size)
        if self.config.eval_kl and self.reference.ready and records:
            from tunelab.align.kl import heldout_kl
            from tunelab.eval.tasks import render

            prompts = list(dict.fromkeys(render(r, self.template, self.tokenizer) for r in records))  # each once
            result.update(heldout_kl(model, self.tokenizer, prompts, self.reference, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size))
        return result

    @torch.no_grad()
    def _unpaired_eval(self, model: nn.Module, records: Sequence[Any], batch_size: int) -> dict[str, float]:
        device = next(model.parameters()).device
        good, bad = [], []
        for start in range(0, len(records), batch_size):
            batch = self.collate_fn(list(records[start : start + batch_size]))
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            reward = unpaired_logps(model, batch)[:, 0] - self.reference.logps(model, batch, unpaired_logps)[:, 0]
            good += reward[batch["desirable"]].tolist()
            bad += reward[~batch["desirable"]].tolist()
        mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
        margin = mean(good) - mean(bad)
        return {"reward_desirable": mean(good), "reward_undesirable": mean(bad), "reward_margin": margin,
                "score": margin}

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference.load_state_dict(state.get("reference", {}))
