"""``reward``: a Bradley–Terry reward model, a scalar head on any backbone trained with any tunelab method.

The reward model r_φ(x, y) reads the last hidden state at the final token of prompt + completion
through a linear head (``tunelab.models.heads`` kind ``scalar``). For preference pairs it maximises the
Bradley–Terry likelihood that the chosen completion wins (Ouyang et al. 2022, arXiv:2203.02155):

    L = −log σ(r_φ(x, y_w) − r_φ(x, y_l))  [+ η (r_φ(x, y_w) + r_φ(x, y_l))²  reward centring,
                                            Eisenstein et al. 2023, arXiv:2312.09244]

How the code maps to it: the head lives in :class:`~tunelab.models.heads.TaskHeads` returned from
``modules()`` (so it trains and is checkpointed with the adapter); one forward of the 2B concatenated
rows gives (r_w, r_l); :func:`tunelab.align.losses.reward_loss` (TRL-parity tested) is the loss.
``evaluate`` reports held-out pairwise accuracy (share of pairs with r_w > r_l).

As a stage on a causal LM the objective keeps ``model_task: causal_lm`` (the head is the objective's,
not the model's). When the stage trained its own adapter on top of others (``stages: - method: ...``),
``on_stage_end`` takes that adapter off the model — the policy later stages train is left unchanged —
and ``evaluate`` puts it back for scoring. ``save_dir`` writes the reward model (its adapters, the
head and the base model's name) for PPO / GRPO's ``reward: model``; :class:`RewardModel` loads it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab import tuners
from tunelab.align.data import PairCollator
from tunelab.align.logps import concatenate_pairs
from tunelab.align.losses import reward_loss
from tunelab.data.collate import IGNORE_INDEX
from tunelab.errors import ModelError
from tunelab.models.heads import TaskHeads, load_heads, save_heads
from tunelab.train.objective import BaseObjective, LossOutput, ObjectiveConfig
from tunelab.utils import atomic_write_json

HEAD = "reward"
COMPLETION = "completion"  # pooling option: the mean over the completion's tokens
REWARD_MODEL_CONFIG = "reward_model.json"
REWARD_FOLDER = "reward"  # save_outputs: the reward model, beside the cell's adapters
DETACHED_FOLDER = "detached"  # ... and the stage's own adapter when on_stage_end took it off the model


class RewardOptions(ObjectiveConfig):
    """Options of the ``reward`` objective."""

    center_rewards_coefficient: float | None = Field(None, ge=0, description="η of the reward-centring term; "
                                                     "None = off (TRL's default). 0.01 is the paper's setting.")
    pooling: Literal["auto", "last", "first", "mean", "completion"] = Field(
        "auto", description="Which hidden states the head reads: auto = the last real token for decoders; "
        "completion = the mean over the completion's tokens (prompt left out).")
    save_dir: str | None = Field(None, description="Write the trained reward model here (adapters + head) for "
                                 "ppo / grpo with reward: model.")


def _trained_adapters(model: nn.Module) -> list[str]:
    """Adapters with trainable parameters (the runner's naming rule: ``.<adapter>`` in the name)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return [a for a in tuners.adapters(model) if any(f".{a}." in n or n.endswith(f".{a}") for n in names)]


class RewardObjective(BaseObjective):
    """``reward``: Bradley–Terry loss on a scalar head; evaluation = held-out pairwise accuracy."""

    config_class = RewardOptions
    model_task = "causal_lm"

    def __init__(self, config: RewardOptions | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.heads: TaskHeads | None = None
        self.active: list[str] = []  # adapters active while the reward model trained
        self.trained: list[str] = []  # adapters this stage trained
        self.detached: tempfile.TemporaryDirectory | None = None  # its own adapter, taken off after the stage
        self.snapshot: tempfile.TemporaryDirectory | None = None  # the whole reward model when it was taken off

    def make_collator(self, tokenizer: Any, labels: list[str] | None, max_length: int = 256,
                      template: str = "plain", **_: Any) -> Callable:
        return PairCollator(tokenizer, max_length=max_length, template=template)

    def ensure_heads(self, model: nn.Module) -> TaskHeads:
        if self.heads is None:
            self.heads = TaskHeads.for_model(model)
            completion = self.config.pooling == COMPLETION
            self.heads.add_head(HEAD, "scalar", pooling="mean" if completion else self.config.pooling)
        return self.heads

    def setup(self, model: nn.Module, accelerator: Any) -> None:
        self.ensure_heads(model)
        super().setup(model, accelerator)
        self.active = tuners.active_adapters(model)
        self.trained = _trained_adapters(model)

    def modules(self) -> list[nn.Module]:
        return [self.heads] if self.heads is not None else []

    def rewards(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected), each (B,), from one forward of the 2B concatenated rows."""
        input_ids, attention_mask, labels = concatenate_pairs(batch)
        heads = self.ensure_heads(model)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.config.pooling == COMPLETION:  # the head averages the completion's tokens (+ EOS) only
            inputs["pool_mask"] = (labels != IGNORE_INDEX) & attention_mask.bool()
        values = heads(model, inputs, task=HEAD).logits  # (2B,)
        return values.float().chunk(2)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        chosen, rejected = self.rewards(model, batch)
        loss = reward_loss(chosen, rejected, center_rewards_coefficient=self.config.center_rewards_coefficient)
        return LossOutput(loss, {
            "accuracy": float((chosen > rejected).float().mean()),
            "margin": float((chosen - rejected).detach().mean()),
            "rewards/chosen": float(chosen.detach().mean()),
            "rewards/rejected": float(rejected.detach().mean()),
        })

    @torch.no_grad()
    def evaluate(self, model: nn.Module, records: Sequence[Any], batch_size: int = 16, **_: Any) -> dict[str, float]:
        """Held-out pairwise accuracy (r_w > r_l) and mean margin r_w − r_l."""
        with self._attached(model):
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            wins, margins = [], []
            for start in range(0, len(records), batch_size):
                batch = self.collate_fn(list(records[start : start + batch_size]))
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                chosen, rejected = self.rewards(model, batch)
                wins += (chosen > rejected).tolist()
                margins += (chosen - rejected).tolist()
            model.train(was_training)
        accuracy = sum(wins) / len(wins)
        return {"accuracy": accuracy, "margin": sum(margins) / len(margins), "score": accuracy}

    def on_stage_end(self, model: nn.Module, records: Sequence[Any]) -> None:
        others = [a for a in tuners.adapters(model) if a not in self.trained]
        if self.trained and others:  # a reward adapter stacked on the policy: take it off
            self.snapshot = tempfile.TemporaryDirectory(prefix="tunelab-reward-model-")
            save_reward_model(model, self.ensure_heads(model), self.snapshot.name, trained=self.trained,
                              pooling=self.config.pooling)
            if self.config.save_dir:  # the same files: copied, not written a second time
                shutil.copytree(self.snapshot.name, self.config.save_dir, dirs_exist_ok=True)
            self.detached = tempfile.TemporaryDirectory(prefix="tunelab-reward-")
            tuners.save(model, self.detached.name, adapter_names=self.trained)
            self._take_off(model)
        elif self.config.save_dir:
            save_reward_model(model, self.ensure_heads(model), self.config.save_dir, trained=self.trained,
                              pooling=self.config.pooling)

    def _take_off(self, model: nn.Module) -> None:
        """Delete the stage's own adapters; the policy's adapters that were active stay active."""
        previous = [a for a in tuners.active_adapters(model) if a not in self.trained]
        others = [a for a in tuners.adapters(model) if a not in self.trained]
        for name in self.trained:
            tuners.delete_adapter(model, name)
        tuners.set_active(model, previous or others)

    def save_outputs(self, model: nn.Module, directory: Path) -> dict[str, Path]:
        """The reward model in ``directory/reward`` (adapters, head, ``reward_model.json``; load it with
        :meth:`RewardModel.load` or use it as PPO / GRPO's ``reward_model``). When the stage took its own
        adapter off the policy, the model as it was then, plus that adapter alone in ``detached/`` (what
        :meth:`load_outputs` needs to take it off again in a resumed run)."""
        if self.heads is None:
            return {}
        folder = Path(directory) / REWARD_FOLDER
        if folder.exists():
            shutil.rmtree(folder)
        if self.snapshot is None:
            save_reward_model(model, self.heads, folder, trained=self.trained, pooling=self.config.pooling)
        else:
            shutil.copytree(self.snapshot.name, folder)
            shutil.copytree(self.detached.name, folder / DETACHED_FOLDER)
        return {"reward_model": folder}

    def load_outputs(self, model: nn.Module, directory: Path) -> None:
        """A finished reward stage of a resumed run: its head back, and its own adapter taken off again (kept
        aside for :meth:`evaluate`) exactly as :meth:`on_stage_end` left it."""
        folder = Path(directory) / REWARD_FOLDER
        if not (folder / REWARD_MODEL_CONFIG).is_file():
            return
        record = json.loads((folder / REWARD_MODEL_CONFIG).read_text())
        self.heads = load_heads(self.ensure_heads(model), folder)
        self.active, self.trained = record["active"], record.get("trained", [])
        if (folder / DETACHED_FOLDER).is_dir():
            self.snapshot = tempfile.TemporaryDirectory(prefix="tunelab-reward-model-")
            shutil.copytree(folder, self.snapshot.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(DETACHED_FOLDER))
            self.detached = tempfile.TemporaryDirectory(prefix="tunelab-reward-")
            shutil.copytree(folder / DETACHED_FOLDER, self.detached.name, dirs_exist_ok=True)
            self._take_off(model)

    def _attached(self, model: nn.Module):
        """Context: the reward model's adapters on and active (re-loaded when the stage took them off)."""
        from contextlib import contextmanager

        @contextmanager
        def attach():
            if self.detached is None:
                yield
                return
            previous = tuners.active_adapters(model)
            tuners.load(model, self.detached.name)
            tuners.set_active(model, self.active)
            try:
                yield
            finally:
                for name in self.trained:
                    tuners.delete_adapter(model, name)
                tuners.set_active(model, previous)

        return attach()


def save_reward_model(model: nn.Module, heads: TaskHeads, directory: str | Path,
                      trained: Sequence[str] = (), pooling: str = "auto") -> Path:
    """Adapters (active ones), the reward head and ``reward_model.json`` (base model, active adapters, the
    adapters the reward stage trained, the reward objective's pooling)."""
    directory = Path(directory)
    active = tuners.active_adapters(model)
    if active:
        tuners.save(model, directory, adapter_names=active)
    save_heads(heads, directory)
    base = getattr(getattr(model, "config", None), "name_or_path", None)
    atomic_write_json(directory / REWARD_MODEL_CONFIG, {"base": base, "active": active, "head": HEAD,
                                                        "trained": list(trained), "pooling": pooling})
    return directory


class RewardModel:
    """A trained reward model for PPO / GRPO: ``score(sequences) -> (B,)`` rewards."""

    def __init__(self, model: nn.Module, heads: TaskHeads, pooling: str = "auto") -> None:
        self.model, self.heads, self.pooling = model.eval(), heads.eval(), pooling

    @classmethod
    def load(cls, directory: str | Path, base: str | None = None) -> RewardModel:
        """Rebuild from :func:`save_reward_model`'s directory (``base`` overrides the saved base model)."""
        from tunelab.models import zoo

        directory = Path(directory)
        if not (directory / REWARD_MODEL_CONFIG).is_file():
            raise ModelError(f"no {REWARD_MODEL_CONFIG} in {directory}; train a reward objective with save_dir first")
        record = json.loads((directory / REWARD_MODEL_CONFIG).read_text())
        model, _ = zoo.load(base or record["base"], task="causal_lm", progress=False)
        if record["active"]:
            tuners.load(model, directory)
            tuners.set_active(model, record["active"])
        model.requires_grad_(False)
        return cls(model, load_heads(model, directory), pooling=record.get("pooling", "auto"))

    @property
    def needs_completion_mask(self) -> bool:
        """True for a model trained with ``pooling: completion``: ``score`` then needs ``completion_mask``."""
        return self.pooling == COMPLETION

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              completion_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) rewards of prompt + completion rows; ``completion_mask`` (N, S) marks the completion's real
        tokens, the last S columns (needed by a model trained with ``pooling: completion``)."""
        device = next(self.model.parameters()).device
        batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if self.pooling == COMPLETION:
            if completion_mask is None:
                raise ModelError("this reward model reads the completion's tokens (pooling: completion); "
                                 "pass completion_mask to score()")
            prompt = torch.zeros(input_ids.shape[0], input_ids.shape[1] - completion_mask.shape[1],
                                 dtype=torch.bool, device=device)
            batch["pool_mask"] = torch.cat([prompt, completion_mask.to(device).bool()], dim=1) & batch[
                "attention_mask"].bool()
        return self.heads(self.model, batch, task=HEAD).logits.float()
