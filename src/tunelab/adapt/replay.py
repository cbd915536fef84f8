"""Experience replay: keep a small buffer of earlier domains' examples and mix it into every step.

Idea (Rolnick et al. 2019, "Experience Replay for Continual Learning", arXiv:1811.11682; Chaudhry et
al. 2019, "On Tiny Episodic Memories", arXiv:1902.10486): rehearsing even a few stored examples of the
old domains bounds forgetting. With replay ratio ρ, a step on B current examples also trains on
m = round(ρ B / (1 − ρ)) buffer examples, and the loss is the example-weighted mean

    L = (B · L_current + m · L_buffer) / (B + m)

— a mixed batch in which a fraction ρ of the examples is replayed.

Two buffer policies, both of total size M and filled at the end of each stage:

- ``reservoir`` (Vitter's Algorithm R, 1985): the stages' records form one stream; record n (1-based)
  enters a full buffer with probability M/n, replacing a uniformly chosen slot. Every record seen so far
  is in the buffer with the same probability M/N, whatever its stage.
- ``quota``: each finished domain keeps an equal share ⌊M / #domains⌋ (a seeded sample of its records;
  older domains shrink to make room).

Code map: :func:`reservoir_update` and :func:`quota_update` are the policies (pure, seeded); the
buffer lives in the model's cross-stage store (:mod:`tunelab.adapt.store`), filled by ``on_stage_end``;
``loss`` draws the m buffer examples with a seeded :class:`~tunelab.train.samplers.EpochSampler` whose
position, together with the buffer itself, is the objective's ``state_dict`` — so a resumed stage
replays exactly the same examples. Replay runs only in training mode (the periodic eval loss is the
current domain's).

Under data parallelism (W processes, each with B/W current rows) B and m are the *global* counts: every
rank draws the same m buffer indices and replays its strided share m_r, and its loss is

    L_r = (B · L_current,r + W · m_r · L_buffer,r) / (B + m)

so that the mean over ranks (what DDP's gradient averaging optimises) is the one-process L above — a rank
whose share is empty (m < W) trains on its current rows only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field
from torch import nn

from tunelab.adapt.store import store
from tunelab.objectives.sft import SFTObjective, SFTOptions
from tunelab.train.objective import LossOutput
from tunelab.train.samplers import EpochSampler, epoch_seed


class ReplayOptions(SFTOptions):
    """Options of the ``replay`` objective."""

    buffer_size: int = Field(200, gt=0, description="M: examples kept in the buffer over all earlier stages.")
    policy: Literal["reservoir", "quota"] = Field("reservoir", description="How the buffer is filled.")
    replay_ratio: float = Field(0.25, gt=0, lt=1, description="ρ: share of each step's examples drawn from the buffer.")
    seed: int = Field(0, ge=0, description="Seeds the buffer policy and the replay order.")


def reservoir_update(buffer: list, seen: int, stream: Sequence[Any], size: int, seed: int) -> tuple[list, int]:
    """Algorithm R over ``stream`` continuing a buffer that has seen ``seen`` items -> (buffer, seen)."""
    buffer = list(buffer)
    rng = random.Random(epoch_seed(seed, seen))
    for item in stream:
        seen += 1
        if len(buffer) < size:
            buffer.append(item)
        else:
            slot = rng.randrange(seen)  # uniform in [0, seen)
            if slot < size:
                buffer[slot] = item
    return buffer, seen


def quota_update(groups: list[list], stream: Sequence[Any], size: int, seed: int) -> list[list]:
    """Per-domain quota: add ``stream`` as a new group, then keep ⌊size / #groups⌋ of each group."""
    fresh = list(stream)
    random.Random(epoch_seed(seed, len(groups))).shuffle(fresh)
    groups = [list(g) for g in groups] + [fresh]
    quota = max(1, size // len(groups))
    return [g[:quota] for g in groups]  # each group was shuffled once: a prefix is a random sample


def replay_count(batch_size: int, ratio: float) -> int:
    """m = round(ρ B / (1 − ρ)), at least 1."""
    return max(1, round(ratio * batch_size / (1.0 - ratio)))


class ReplayObjective(SFTObjective):
    """``replay``: SFT on the current stage mixed with a buffer of earlier stages' examples."""

    config_class = ReplayOptions

    def __init__(self, config=None, **options: Any) -> None:
        super().__init__(config, **options)
        self.buffer: list = []
        self.replay: EpochSampler | None = None
        self.pending: dict | None = None  # a resumed replay position, applied when the sampler is built
        self.rank, self.world_size = 0, 1  # this process among the data-parallel ones (set in setup)

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        super().setup(model, accelerator)
        self.buffer = buffer_records(store(model).get("replay"))
        self.replay = None
        self.rank = getattr(accelerator, "process_index", 0)
        self.world_size = getattr(accelerator, "num_processes", 1)

    def _replay_sampler(self, batch_size: int) -> EpochSampler:
        if self.replay is None:
            count = replay_count(batch_size, self.config.replay_ratio)
            self.replay = EpochSampler(len(self.buffer), count, epoch_seed(self.config.seed, 7))
            if self.pending is not None:
                self.replay.load_state_dict(self.pending)
                self.pending = None
        return self.replay

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        current = model(**batch).loss
        if not self.buffer or not model.training:
            return LossOutput(current, {"ce": float(current.detach())})
        world = self.world_size
        rows = int(batch["input_ids"].shape[0]) * world  # B: the global batch
        indices = self._replay_sampler(rows).next_indices()  # the same m indices on every rank
        mine = indices[self.rank :: world]
        m = len(indices)
        if not mine:  # m < W: this rank replays nothing this step
            return LossOutput(rows * current / (rows + m), {"ce": float(current.detach())})
        replayed = self.collate_fn([self.buffer[i] for i in mine])
        replayed = {k: v.to(current.device) for k, v in replayed.items()}
        old = model(**replayed).loss
        total = (rows * current + world * len(mine) * old) / (rows + m)
        return LossOutput(total, {"ce": float(current.detach()), "ce_replay": float(old.detach())})

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        state = store(model).setdefault("replay", {"policy": self.config.policy, "buffer": [], "seen": 0, "groups": []})
        size, seed = self.config.buffer_size, self.config.seed
        if self.config.policy == "reservoir":
            state["buffer"], state["seen"] = reservoir_update(state["buffer"], state["seen"], records, size, seed)
        else:
            state["groups"] = quota_update(state["groups"], records, size, seed)
            state["buffer"] = [r for g in state["groups"] for r in g]
        state["policy"] = self.config.policy

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": list(self.buffer), "replay": self.replay.state_dict() if self.replay else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = list(state.get("buffer", []))
        self.replay = None  # its draw size comes from the batch: rebuilt at the next step, at this position
        self.pending = state.get("replay")


def buffer_records(state: dict | None) -> list:
    """The flat list of buffered records of a store entry (empty before the first stage ends)."""
    return list(state["buffer"]) if state else []
