"""``TrainConfig``: the options of the training loop, validated by pydantic.

One source of truth: the same model checks keyword arguments, the ``train:`` section of an experiment
YAML (``extra="forbid"`` catches misspelt keys) and documents every option and why its default
(``TrainConfig.model_json_schema()`` carries the descriptions). Invalid values raise
:class:`~tunelab.errors.ConfigError` with one line naming the field, the problem and the fix.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab.errors import ConfigError


class TrainConfig(BaseModel):
    """Options of :func:`train`; the ``train:`` section of an experiment YAML.

    Invalid values raise :class:`~tunelab.errors.ConfigError` with a one-line message.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # `learning_rate: .inf` is an error

    learning_rate: float = Field(
        1e-3,
        gt=0,
        description="Peak AdamW learning rate. 1e-3 suits adapters (LoRA, IA3) on small models; use ~1e-5 to 5e-5 for full fine-tuning.",
    )
    max_steps: int = Field(
        200,
        gt=0,
        description="Optimizer steps to train (each step sees batch_size * grad_accum records). 200 is a quick adapter run on the tiny presets.",
    )
    batch_size: int = Field(
        8,
        gt=0,
        description="Records per micro-batch (per process). 8 fits tiny models on a CPU; raise grad_accum rather than this when memory is short.",
    )
    grad_accum: int = Field(
        1,
        ge=1,
        description="Micro-batches whose gradients are averaged into one optimizer step. 1 = no accumulation.",
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="Learning-rate decay after warmup. Cosine is the common default for fine-tuning.",
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Linear warmup length in steps; overrides warmup_ratio when set. None = use warmup_ratio.",
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Warmup as a fraction of max_steps. 0: adapters start at (near) the base model and train stably without warmup; 0.03-0.1 helps full fine-tuning.",
    )
    min_lr_ratio: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Floor of the cosine/linear decay as a fraction of the peak rate. 0 decays to zero, the standard schedule.",
    )
    weight_decay: float = Field(
        0.0,
        ge=0.0,
        description="AdamW decoupled weight decay on trainable matrices (ndim >= 2); biases and norm scales never decay. 0 (off) keeps methods comparable; 0.01-0.1 is the usual regulariser when a run overfits.",
    )
    adam_betas: tuple[float, float] = Field(
        (0.9, 0.999), description="AdamW (beta1, beta2); the PyTorch defaults."
    )
    adam_eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon; the PyTorch default.")
    max_grad_norm: float | None = Field(
        1.0,
        gt=0.0,
        description="Clip the global gradient L2 norm to this value; None disables clipping. 1.0 is the usual guard against loss spikes.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        description="Autocast precision. 'no' (fp32) is exact and what CPUs do best; fp16 needs a GPU and falls back to 'no' with a notice.",
    )
    eval_every: int | None = Field(
        None,
        gt=0,
        description="Evaluate the mean eval loss every N optimizer steps (and always at the end). None = only at the end.",
    )
    eval_batch_size: int | None = Field(None, gt=0, description="Records per eval batch. None = batch_size.")
    max_eval_batches: int | None = Field(
        None,
        gt=0,
        description="Cap on eval batches per evaluation, to keep periodic evals cheap. None = all eval records.",
    )
    save_every: int | None = Field(
        None,
        gt=0,
        description="Checkpoint every N optimizer steps (needs output_dir); a checkpoint is also written at the end. None = only at the end.",
    )
    log_every: int = Field(
        10,
        gt=0,
        description="Write a metrics line (mean loss, lr, grad norm, throughput) every N optimizer steps, and at the last step.",
    )
    seed: int = Field(
        0, ge=0, lt=2**63, description="Seeds data order, dropout and every global generator, so a run is reproducible."
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        # YAML `max_steps: true` would otherwise pass as 1; no option here is a boolean
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean (true/false)")
        return value

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError("both betas must lie in [0, 1)")
        return betas

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(_one_line(error)) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> TrainConfig:
        """Validate a mapping (e.g. a YAML section); errors become :class:`ConfigError`."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as error:
            raise ConfigError(_one_line(error)) from None


def _one_line(error: ValidationError) -> str:
    """``train.<field>: <problem> (got <value>); <fix>`` for the first problem pydantic found."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "train"
    fix = (
        "remove it or check the spelling against TrainConfig's fields"
        if first["type"] == "extra_forbidden"
        else "fix this value in the train config"
    )
    more = f" ({error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return f"train.{where}: {first['msg']} (got {first.get('input')!r}); {fix}{more}"
