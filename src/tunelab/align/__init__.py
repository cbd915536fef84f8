"""tunelab.align: alignment on top of any PEFT method — reward models, DPO and its variants, KTO, PPO, GRPO.

Pure losses (TRL-parity tested) live in :mod:`tunelab.align.losses` and :mod:`tunelab.align.rl`; the
objectives (``reward``, ``dpo``, ``kto``, ``ppo``, ``grpo``) run them on the shared training loop, with
the reference made explicit by :class:`~tunelab.align.reference.Reference`. Their evaluations share the
held-out KL to the reference (:mod:`tunelab.align.kl`), which the report plots against reward
(:mod:`tunelab.align.report`). See ``docs/align.md``.
"""

from tunelab.align.dpo import DPOObjective, DPOOptions
from tunelab.align.kto import KTOObjective, KTOOptions
from tunelab.align.online import GRPOObjective, GRPOOptions, PPOObjective, PPOOptions
from tunelab.align.reference import Reference
from tunelab.align.reward import RewardModel, RewardObjective, RewardOptions

__all__ = [
    "DPOObjective", "DPOOptions", "GRPOObjective", "GRPOOptions", "KTOObjective", "KTOOptions", "PPOObjective",
    "PPOOptions", "Reference", "RewardModel", "RewardObjective", "RewardOptions",
]
