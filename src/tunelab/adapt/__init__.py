"""tunelab.adapt: domain adaptation and continual learning, each strategy an objective (docs/adapt.md).

Domain adaptation (one target domain, strategies side by side in one grid):

- methods (full, LoRA, bottleneck, prompt tuning, prefix, P-Tuning v2) with the plain ``sft`` objective;
- ``icl`` (:mod:`.icl`): prompt engineering without training, zero-/k-shot demonstrations;
- DAPT / TAPT: stages ``lm`` on the domain corpus (``data.tasks: [corpus]``) or on the task's inputs
  (``lm`` with ``text_field: prompt``), then ``sft``;
- ``domain_kd`` (:mod:`.kd`): adapt while a general teacher keeps the model close on general data.

Continual learning over a stage list of domains (:mod:`.store` carries state across stages):
``replay`` (:mod:`.replay`), ``ewc`` (:mod:`.ewc`), ``lwf`` (:mod:`.lwf`), ``olora`` (:mod:`.olora`),
``per_domain`` (:mod:`.per_domain`) and the ``router`` (:mod:`.router`); naive sequential fine-tuning is
``sft`` over the stages. :mod:`.metrics` turns the runner's stage matrix into ACC, BWT, FWT and
forgetting; :mod:`.analysis` builds the cross-domain transfer matrix.
"""

from tunelab.adapt.ewc import EWCObjective, EWCOptions, ewc_penalty, fisher_diagonal
from tunelab.adapt.icl import ICLObjective, ICLOptions, with_demonstrations
from tunelab.adapt.kd import DomainKDObjective, DomainKDOptions
from tunelab.adapt.lwf import LwFObjective, LwFOptions
from tunelab.adapt.olora import OLoRAObjective, OLoRAOptions, orthogonality_penalty
from tunelab.adapt.per_domain import PerDomainObjective, PerDomainOptions
from tunelab.adapt.replay import ReplayObjective, ReplayOptions, quota_update, reservoir_update
from tunelab.adapt.router import RouterObjective, RouterOptions
from tunelab.adapt.store import store

__all__ = [
    "DomainKDObjective", "DomainKDOptions", "EWCObjective", "EWCOptions", "ICLObjective", "ICLOptions",
    "LwFObjective", "LwFOptions", "OLoRAObjective", "OLoRAOptions", "PerDomainObjective", "PerDomainOptions",
    "ReplayObjective", "ReplayOptions", "RouterObjective", "RouterOptions", "ewc_penalty", "fisher_diagonal",
    "orthogonality_penalty", "quota_update", "reservoir_update", "store", "with_demonstrations",
]
