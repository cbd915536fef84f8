"""The ``search:`` section of an experiment spec: the hyper-parameter space that ``tunelab tune`` explores.

Each entry maps a dotted key of the cell spec (the same keys ``grid.params`` and ``--set`` take) to a
distribution. Training *and* method options can be searched:

```yaml
search:
  metric: score            # a held-out metric of the result (score, rougeL, ...) or eval_loss
  direction: maximize      # maximize | minimize
  params:
    train.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    method.options.r: {type: int, low: 2, high: 16, log: true}
    method.options.lora_dropout: {type: float, low: 0.0, high: 0.2}
    method.options.target_modules: {type: categorical, choices: [all-linear, [q_proj, v_proj]]}
    # relative: low/high are factors of the value the spec gives the key for each tuned method
    # train.learning_rate: {type: float, low: 0.25, high: 4.0, log: true, relative: true}
  pruning: {warmup_steps: 0, startup_trials: 2}
  per_method: false        # true: every method of grid.methods gets `trials` trials (equal budget)
```

This module only holds the schema (no Optuna import); :mod:`tunelab.experiments.tune` runs the search.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ParamSpace(_Section):
    """One searched value: a float or int range (optionally log-uniform, optionally stepped) or a choice."""

    type: Literal["float", "int", "categorical"] = Field(..., description="Distribution kind.")
    low: float | None = Field(None, description="Lower bound (float/int).")
    high: float | None = Field(None, description="Upper bound, inclusive (float/int).")
    log: bool = Field(False, description="Sample on a log scale (low must be > 0).")
    step: float | None = Field(None, gt=0, description="Grid step (not with log).")
    choices: list[Any] | None = Field(None, min_length=1, description="Values of a categorical parameter.")
    relative: bool = Field(False, description="low/high are factors of the value the spec gives this key for the "
                           "tuned method (a float range around each method's own setting; trial 0 is factor 1).")

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpace:
        if self.relative and self.type != "float":
            raise ValueError("relative: true needs a float range (a factor of the method's own value)")
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs 'choices'")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes 'choices', not low/high")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is above high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("log-scale parameters need low > 0")
        if self.log and self.step is not None:
            raise ValueError("'step' and 'log' cannot be combined")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an int parameter needs integer low and high")
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes low/high, not 'choices'")
        return self


class PruningSpec(_Section):
    """Median pruning on the eval curve: a trial stops when its eval loss is worse than the median of
    earlier trials' at the same step."""

    enabled: bool = True
    startup_trials: int = Field(2, ge=0, description="Trials that always finish before pruning starts.")
    warmup_steps: int = Field(0, ge=0, description="Steps of each trial before it can be pruned.")


class SearchSpec(_Section):
    params: dict[str, ParamSpace] = Field(..., min_length=1, description="Dotted key -> distribution.")
    metric: str = Field("score", description="A held-out metric of the result, or eval_loss (the final one).")
    direction: Literal["maximize", "minimize"] = Field("maximize", description="Whether higher metric is better.")
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    per_method: bool = Field(False, description="Equal budget: tune every method of grid.methods with the same "
                             "number of trials, then compare each method's best configuration.")

    @model_validator(mode="after")
    def _dotted_keys(self) -> SearchSpec:
        for key in self.params:
            head = key.split(".")[0]
            if "." not in key or head not in ("train", "method", "data", "objective", "model", "eval"):
                raise ValueError(f"search key {key!r} must be a dotted key of a section, e.g. train.learning_rate "
                                 "or method.options.r")
            if head == "method" and not key.startswith("method.options."):
                raise ValueError(f"search key {key!r}: only method.options.* can be searched in the method section")
        return self
