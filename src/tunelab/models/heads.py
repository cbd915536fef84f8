"""Named task heads on one backbone (AdapterHub-style prediction heads).

Several tasks share one transformer; each task owns a small head on the backbone's last hidden
state ``h`` (B, T, H), and the active task (or a task name per row) picks which head runs:

    classification         pool(h) W + b    -> (B, C)     L = CE(logits, y)               y = -100 ignored
    token_classification   h W + b          -> (B, T, C)  L = CE over tokens              y = -100 ignored
    span_qa                h W + b          -> (B, T, 2)  L = (CE(start) + CE(end)) / 2   (extractive QA)
    lm                     the model's own LM logits (B, T, V); L = CE of the next token (decoders)
                           or of the token itself (masked LMs), as Hugging Face computes it
    scalar                 pool(h) w + b    -> (B,)       L = MSE(value, y)   (value / reward head)

``pool`` takes the last non-pad token for decoders (the only position that has seen the whole
sequence), the first token ([CLS]) for encoders, or the masked mean; both ``last`` and ``first`` read
the attention mask, so left and right padding both work.

How the code maps to it: :class:`TaskHeads` is an ``nn.Module`` holding a ``ModuleDict`` of heads by
task name; it never owns the backbone (``forward(model, batch, task=...)`` takes it), so an
objective hands ``heads`` to the optimizer and checkpoint through its ``modules()``. The backbone
runs once per batch with ``output_hidden_states=True``; a mixed-task batch (a task name per row) is
grouped by task, and each head runs once on its rows. The LM logits (B, T, V) are the largest tensor
of a decoder's step, so the backbone's LM head (its output embeddings, when a plain ``nn.Linear``) runs
only on the rows of ``lm`` tasks: a forward pre-hook selects those rows of its input, so a batch of a
classification task computes no vocabulary logits, and a mixed batch computes them for its generation
rows alone (exact: the LM head is row-wise). :func:`save_heads` / :func:`load_heads` write
``heads.safetensors`` + ``heads.json`` next to the adapter files of ``tuners.save``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from tunelab.data.collate import IGNORE_INDEX
from tunelab.errors import ConfigError, ModelError
from tunelab.utils import atomic_path, atomic_write_json, unwrap_model

HEAD_KINDS = ("classification", "token_classification", "span_qa", "lm", "scalar")
POOLINGS = ("last", "first", "mean", "none")  # "none" (a value per token) only for scalar heads
HEADS_WEIGHTS = "heads.safetensors"
HEADS_CONFIG = "heads.json"
# What the backbone gets from a batch: never labels, which would make a HF *For... model compute its
# own loss on labels shaped for our heads.
BACKBONE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


@dataclass(frozen=True)
class HeadSpec:
    """What rebuilds a head: its kind, output size, pooling and label names (saved in heads.json)."""

    kind: str
    num_labels: int | None = None  # None for lm heads (the vocabulary)
    pooling: str | None = None  # None for per-token kinds
    label_names: list[str] | None = None
    dropout: float = 0.0


@dataclass
class HeadOutput:
    """What :meth:`TaskHeads.forward` returns.

    ``logits`` is a tensor for one task, or ``{task: logits of its rows}`` for a task per row;
    ``rows`` maps each task to its row indices (LongTensor) in the batch; ``losses`` holds the loss of
    every task whose labels were in the batch and ``loss`` their row-weighted mean
    ``sum_t n_t L_t / sum_t n_t`` (None without labels); ``hidden_states`` is the last layer (B, T, H).
    """

    logits: torch.Tensor | dict[str, torch.Tensor]
    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden_states: torch.Tensor | None = None

    def per_row(self) -> list[torch.Tensor]:
        """The logits of each row, in batch order (row i's leading batch dimension removed)."""
        logits = self.logits if isinstance(self.logits, dict) else {name: self.logits for name in self.rows}
        by_row: dict[int, torch.Tensor] = {}
        for name, rows in self.rows.items():
            for position, row in enumerate(rows.tolist()):
                by_row[row] = logits[name][position]
        return [by_row[row] for row in sorted(by_row)]


def row_weighted_loss(losses: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """``Σ_t n_t L_t / Σ_t n_t`` over the tasks with a loss (``n_t`` = len(rows[t])); None without any."""
    if not losses:
        return None
    counts = {name: len(rows[name]) for name in losses}
    return sum(counts[name] * losses[name] for name in losses) / sum(counts.values())


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) -> (B, H): the ``last`` or ``first`` unmasked token, or the masked ``mean``."""
    mask = attention_mask.to(hidden.device)  # (B, T)
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device)  # (T,)
    # Strictly increasing (last) / decreasing (first) scores over real tokens; argmax finds the end.
    score = positions + 1 if pooling == "last" else hidden.shape[1] - positions
    index = (mask.long() * score).argmax(-1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def best_spans(logits: torch.Tensor, max_answer_length: int = 30,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode extractive-QA spans: argmax over ``start <= end < start + max_answer_length`` of s_i + e_j.

    Args:
        logits: a ``span_qa`` head's output, (B, T, 2) = start and end logits per token.
        max_answer_length: longest span in tokens.
        mask: (B, T), 1 where a span may start or end (e.g. context tokens only); default all.

    Returns:
        ``(start, end, score)``, each (B,); ``end`` is inclusive. A row with no allowed span gives -inf.
    """
    start_logits, end_logits = logits[..., 0].float(), logits[..., 1].float()  # (B, T) each
    length = logits.shape[1]
    scores = start_logits[:, :, None] + end_logits[:, None, :]  # (B, T, T): start i, end j
    starts = torch.arange(length, device=logits.device)[:, None]
    ends = torch.arange(length, device=logits.device)[None, :]
    valid = (ends >= starts) & (ends - starts < max_answer_length)  # (T, T)
    if mask is not None:
        allowed = mask.bool().to(logits.device)
        valid = valid & allowed[:, :, None] & allowed[:, None, :]  # (B, T, T)
    flat = scores.masked_fill(~valid, float("-inf")).flatten(1)  # (B, T*T)
    best = flat.argmax(-1)  # (B,)
    return best // length, best % length, flat.gather(1, best[:, None]).squeeze(1)


def is_decoder(model: nn.Module) -> bool:
    """True for causal decoders (pool the last token), False for masked-LM encoders (pool [CLS])."""
    config = model.config
    if getattr(config, "is_decoder", False):
        return True
    # transformers 5 dropped ``is_decoder`` from decoder-only configs; encoders are the masked LMs.
    return config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class LinearHead(nn.Module):
    """Dropout + one Linear on the hidden state; subclasses choose what it sees and the loss."""

    def __init__(self, spec: HeadSpec, hidden_size: int, init_std: float) -> None:
        super().__init__()
        self.spec = spec
        self.dropout = nn.Dropout(spec.dropout)
        self.proj = nn.Linear(hidden_size, spec.num_labels)
        nn.init.normal_(self.proj.weight, std=init_std)  # as HF initialises its classifiers
        nn.init.zeros_(self.proj.bias)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        # Heads keep their own dtype (float32 by default) under a bf16 backbone.
        return self.proj(self.dropout(hidden.to(self.proj.weight.dtype)))


class ClassificationHead(LinearHead):
    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lm_logits: Any = None) -> torch.Tensor:
        return self.project(pool(hidden, attention_mask, self.spec.pooling))  # (B, C)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX)


class TokenClassificationHead(LinearHead):
    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lm_logits: Any = None) -> torch.Tensor:
        return self.project(hidden)  # (B, T, C)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().long(), ignore_index=IGNORE_INDEX)


class SpanQAHead(LinearHead):
    """Start and end logits per token; labels are (B, 2) = (start, end) token positions (inclusive)."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lm_logits: Any = None) -> torch.Tensor:
        return self.project(hidden)  # (B, T, 2)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        start = F.cross_entropy(logits[..., 0].float(), labels[:, 0], ignore_index=IGNORE_INDEX)
        end = F.cross_entropy(logits[..., 1].float(), labels[:, 1], ignore_index=IGNORE_INDEX)
        return (start + end) / 2  # as HF's *ForQuestionAnswering


class ScalarHead(LinearHead):
    """One value per sequence (pooled), or per token with ``pooling="none"`` (PPO's value head)."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lm_logits: Any = None) -> torch.Tensor:
        if self.spec.pooling != "none":
            hidden = pool(hidden, attention_mask, self.spec.pooling)  # (B, H)
        return self.project(hidden).squeeze(-1)  # (B,) or (B, T)

    def loss(self, values: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if values.dim() == 2:  # per token: padding carries no target
            real = attention_mask.bool()
            values, labels = values[real], labels[real]
        return F.mse_loss(values.float(), labels.float())


class LMHead(nn.Module):
    """No parameters: the backbone's own LM logits, so generation tasks sit beside the others."""

    def __init__(self, spec: HeadSpec, shift: bool) -> None:
        super().__init__()
        self.spec = spec
        self.shift = shift  # decoders predict the next token; masked LMs the token itself

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lm_logits: Any = None) -> torch.Tensor:
        if lm_logits is None or lm_logits.dim() != 3:
            raise ModelError("an lm head needs a backbone with an LM head; load it as *ForCausalLM / *ForMaskedLM")
        return lm_logits  # (B, T, V)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().long(), ignore_index=IGNORE_INDEX)


HEAD_CLASSES: dict[str, type[LinearHead]] = {
    "classification": ClassificationHead, "token_classification": TokenClassificationHead,
    "span_qa": SpanQAHead, "scalar": ScalarHead,
}
FIXED_SIZES = {"span_qa": 2, "scalar": 1}  # kinds whose output size is not the user's choice


class TaskHeads(nn.Module):
    """Named heads on one backbone; ``forward(model, batch, task=...)`` runs the backbone once.

    Example:
        heads = TaskHeads.for_model(model)
        heads.add_head("domain", "classification", label_names=["general", "medical"])
        heads.add_head("ner", "token_classification", num_labels=9)
        out = heads(model, batch, task="ner")                 # out.logits (B, T, 9), out.loss
        out = heads(model, batch, task=["domain", "ner", ...])  # one task per row
    """

    def __init__(self, hidden_size: int, *, decoder: bool, init_std: float = 0.02) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.decoder = decoder
        self.init_std = init_std
        self.heads = nn.ModuleDict()
        self.active_head: str | None = None
        # Follows .to(device) and is not saved: where new heads are created.
        self.register_buffer("device_anchor", torch.empty(0), persistent=False)

    @classmethod
    def for_model(cls, model: nn.Module) -> TaskHeads:
        """Empty heads sized for a Hugging Face backbone, on its device."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "hidden_size", None) is None:
            raise ModelError(f"TaskHeads needs a Hugging Face model with config.hidden_size; got {type(model).__name__}")
        if getattr(config, "is_encoder_decoder", False):
            raise ModelError("TaskHeads supports encoder-only and decoder-only backbones, not encoder-decoder ones")
        heads = cls(config.hidden_size, decoder=is_decoder(model), init_std=getattr(config, "initializer_range", 0.02))
        parameter = next(model.parameters(), None)
        return heads.to(parameter.device) if parameter is not None else heads

    @property
    def specs(self) -> dict[str, HeadSpec]:
        return {name: head.spec for name, head in self.heads.items()}

    def add_head(self, name: str, kind: str, num_labels: int | None = None, *, label_names: Sequence[str] | None = None,
                 pooling: str = "auto", dropout: float = 0.0) -> nn.Module:
        """Add a head named ``name`` (the first head added becomes the active one).

        Args:
            kind: one of :data:`HEAD_KINDS`.
            num_labels: classes, for classification and token classification (or give ``label_names``).
            label_names: class names, saved with the head.
            pooling: ``auto`` (``last`` for decoders, ``first`` for encoders), ``last``, ``first``, ``mean``;
                ``none`` gives a scalar head one value per token.
            dropout: on the hidden state before the projection.
        """
        spec = self._spec(name, kind, num_labels, label_names, pooling, dropout)
        head = LMHead(spec, shift=self.decoder) if kind == "lm" else HEAD_CLASSES[kind](spec, self.hidden_size, self.init_std)
        self.heads[name] = head.to(self.device_anchor.device)
        if self.active_head is None:
            self.active_head = name
        return head

    def _spec(self, name: str, kind: str, num_labels: int | None, label_names: Sequence[str] | None,
              pooling: str, dropout: float) -> HeadSpec:
        if not isinstance(name, str) or not name or "." in name:
            raise ConfigError(f"head name {name!r} must be a non-empty string without '.'")
        if name in self.heads:
            raise ConfigError(f"a head named {name!r} exists already; heads: {', '.join(self.heads)}")
        if kind not in HEAD_KINDS:
            raise ConfigError(f"unknown head kind {kind!r}; use one of: {', '.join(HEAD_KINDS)}")
        names = list(label_names) if label_names is not None else None
        if names is not None and num_labels is not None and len(names) != num_labels:
            raise ConfigError(f"head {name!r}: num_labels={num_labels} but {len(names)} label_names")
        size = num_labels if num_labels is not None else (len(names) if names is not None else None)
        if kind in FIXED_SIZES:
            if size not in (None, FIXED_SIZES[kind]):
                raise ConfigError(f"a {kind} head has {FIXED_SIZES[kind]} outputs; drop num_labels={size}")
            size = FIXED_SIZES[kind]
        elif kind == "lm":
            size = None
        elif size is None or size < 1:
            raise ConfigError(f"head {name!r} ({kind}) needs num_labels >= 1 or label_names")
        if kind in ("classification", "scalar"):
            pooling = ("last" if self.decoder else "first") if pooling == "auto" else pooling
            if pooling not in POOLINGS or (pooling == "none" and kind != "scalar"):
                allowed = POOLINGS if kind == "scalar" else POOLINGS[:-1]
                raise ConfigError(f"head {name!r}: unknown pooling {pooling!r}; use one of: auto, {', '.join(allowed)}")
        else:
            pooling = None  # per-token kinds see every position
        return HeadSpec(kind=kind, num_labels=size, pooling=pooling, label_names=names, dropout=float(dropout))

    def set_active_head(self, name: str) -> None:
        self._check_known([name])
        self.active_head = name

    @contextmanager
    def using_head(self, name: str) -> Iterator[TaskHeads]:
        """Make ``name`` the active head inside the block; the previous one comes back after."""
        previous = self.active_head
        self.set_active_head(name)
        try:
            yield self
        finally:
            self.active_head = previous

    def _check_known(self, names: Sequence[str]) -> None:
        unknown = sorted(set(names) - set(self.heads))
        if unknown:
            raise ConfigError(f"unknown head {unknown[0]!r}; heads: {', '.join(self.heads) or '(none: call add_head)'}")

    def forward(self, model: nn.Module, batch: Mapping[str, Any], task: str | Sequence[str] | None = None) -> HeadOutput:
        """Run ``model`` once on ``batch`` and the head(s) of ``task`` on its last hidden state.

        Args:
            model: the backbone (``AutoModel``, ``*ForCausalLM``, ... with or without adapters).
            batch: ``input_ids``, ``attention_mask`` (and ``token_type_ids``, ...); optionally labels:
                ``labels`` as one tensor (B, ...) indexed by row, a list of per-row tensors, or
                ``{task: labels of its rows}`` for mixed batches whose tasks have differently shaped
                labels. Span QA also takes HF's ``start_positions`` / ``end_positions``. An optional
                ``pool_mask`` (B, T) replaces ``attention_mask`` as the tokens the heads read (e.g. only a
                completion's tokens for a pooled reward head); the backbone never sees it.
            task: a head name, a head name per row, or None for the active head.
        """
        names = self._task_names(task, batch)
        inputs = {key: batch[key] for key in BACKBONE_INPUTS if key in batch}
        first = next(inputs[key] for key in ("input_ids", "inputs_embeds", "attention_mask") if key in inputs)
        length = first.shape[1]
        groups = self._group_rows(names, first.shape[0], first.device)
        lm_names = [name for name in groups if self.heads[name].spec.kind == "lm"]
        needed = None if lm_names == list(groups) else (  # lm rows, in group order; None = every row
            torch.cat([groups[name] for name in lm_names]) if lm_names else first.new_zeros(0, dtype=torch.long))
        with lm_head_rows(model, needed, first.shape[0]) as lm_state:
            outputs = model(**inputs, output_hidden_states=True, return_dict=True)
        hidden = outputs.hidden_states[-1] if outputs.hidden_states is not None else outputs.last_hidden_state
        hidden = hidden[:, -length:]  # (B, T, H): prompt tuning prepends virtual tokens
        mask = batch.get("pool_mask", batch.get("attention_mask"))  # the tokens a pooled head reads
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device) if mask is None else mask
        lm_logits = getattr(outputs, "logits", None)
        if lm_logits is not None and lm_logits.dim() == 3:
            lm_logits = lm_logits[:, -length:]
        trimmed = lm_state["trimmed"] and lm_logits is not None and len(lm_logits) == len(needed)
        offsets = dict(zip(lm_names, accumulate((len(groups[n]) for n in lm_names), initial=0)))  # name -> first row
        logits, losses = {}, {}
        for name, rows in groups.items():
            whole = len(groups) == 1

            def take(value: Any, rows: torch.Tensor = rows, whole: bool = whole) -> Any:
                return value if whole or value is None else value.index_select(0, rows.to(value.device))

            head = self.heads[name]
            if trimmed:  # the LM logits hold the lm tasks' rows only, task after task: this task's is a slice
                rows_lm = lm_logits[offsets[name] : offsets[name] + len(rows)] if name in offsets else None
            else:
                rows_lm = take(lm_logits)
            logits[name] = head(take(hidden), take(mask), rows_lm)
            labels = self._labels(batch, name, head.spec.kind, rows, whole)
            if labels is not None:
                losses[name] = head.loss(logits[name], labels.to(logits[name].device), take(mask))
        loss = row_weighted_loss(losses, groups)
        single = isinstance(names, str)
        return HeadOutput(logits=logits[names] if single else logits, loss=loss, losses=losses, rows=groups,
                          hidden_states=hidden)

    def _task_names(self, task: str | Sequence[str] | None, batch: Mapping[str, Any]) -> str | list[str]:
        if task is None:
            if self.active_head is None:
                raise ConfigError("no active head: pass task=... or call set_active_head(name)")
            task = self.active_head
        names = task if isinstance(task, str) else list(task)
        self._check_known([names] if isinstance(names, str) else names)
        return names

    @staticmethod
    def _group_rows(names: str | list[str], batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        if isinstance(names, str):
            return {names: torch.arange(batch_size, device=device)}
        if len(names) != batch_size:
            raise ConfigError(f"{len(names)} task names for a batch of {batch_size} rows; give one per row")
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name, []).append(row)
        return {name: torch.tensor(rows, device=device) for name, rows in groups.items()}

    @staticmethod
    def _labels(batch: Mapping[str, Any], name: str, kind: str, rows: torch.Tensor, whole: bool) -> torch.Tensor | None:
        labels = batch.get("labels")
        if isinstance(labels, Mapping):
            return labels.get(name)  # already this task's rows, in batch order
        if kind == "span_qa" and "start_positions" in batch:
            labels = torch.stack([batch["start_positions"], batch["end_positions"]], dim=-1)  # (B, 2)
        if labels is None:
            return None
        if isinstance(labels, (list, tuple)):
            return torch.stack([torch.as_tensor(labels[row]) for row in rows.tolist()])
        return labels if whole else labels.index_select(0, rows.to(labels.device))


@contextmanager
def lm_head_rows(model: nn.Module, rows: torch.Tensor | None, batch_size: int) -> Iterator[dict[str, bool]]:
    """Within the block the model's LM head computes logits for ``rows`` of the batch only (None: all).

    A forward pre-hook on the output embeddings selects the rows of its (B, T, H) input, so the model
    returns logits (len(rows), T, V) in ``rows``' order — exact, as the LM head maps each row alone, and
    any logit post-processing of the model (soft-capping, scaling) is elementwise. Yields a dict whose
    ``trimmed`` says, after the forward, whether the hook selected rows: only for a plain ``nn.Linear``
    output layer called on a (B, T, H) input (an adapter-wrapped LM head, which per-row routing must see
    whole, or an exotic head keeps computing every row); the caller also checks the logits' rows.
    """
    state = {"trimmed": False}
    get = getattr(unwrap_model(model), "get_output_embeddings", None)
    module = get() if rows is not None and callable(get) else None
    if type(module) is not nn.Linear:
        yield state
        return

    def select(_: nn.Module, args: tuple) -> tuple | None:
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] != batch_size:
            return None  # not (B, T, H): this call stays whole
        state["trimmed"] = True
        return (hidden.index_select(0, rows.to(hidden.device)), *args[1:])

    handle = module.register_forward_pre_hook(select)
    try:
        yield state
    finally:
        handle.remove()


def save_heads(heads: TaskHeads, directory: str | os.PathLike) -> Path:
    """Write ``heads.safetensors`` and ``heads.json`` (kinds, sizes, label names) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in heads.state_dict().items()}
    with atomic_path(directory / HEADS_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "tunelab-heads"})
    record = {"format": "tunelab-heads", "version": 1, "hidden_size": heads.hidden_size, "decoder": heads.decoder,
              "init_std": heads.init_std, "active_head": heads.active_head,
              "heads": {name: asdict(spec) for name, spec in heads.specs.items()}}
    atomic_write_json(directory / HEADS_CONFIG, record)  # written last: its presence marks a complete save
    return directory


def load_heads(model_or_heads: nn.Module, directory: str | os.PathLike) -> TaskHeads:
    """Rebuild heads from ``heads.json`` and load their weights.

    Given a backbone, returns new :class:`TaskHeads` on its device; given ``TaskHeads``, adds the saved
    heads it lacks, overwrites the weights of those it has (same kind and size) and returns it.
    """
    directory = Path(directory)
    if not (directory / HEADS_CONFIG).is_file():
        raise ModelError(f"no {HEADS_CONFIG} in {directory}; save heads there with save_heads(heads, directory)")
    record = json.loads((directory / HEADS_CONFIG).read_text(encoding="utf-8"))
    if isinstance(model_or_heads, TaskHeads):
        heads = model_or_heads
    else:
        heads = TaskHeads.for_model(model_or_heads)
        heads.init_std = record.get("init_std", heads.init_std)
    if heads.hidden_size != record["hidden_size"]:
        raise ModelError(f"heads in {directory} are for hidden size {record['hidden_size']}, not {heads.hidden_size}")
    for name, saved in record["heads"].items():
        spec = HeadSpec(**saved)
        if name not in heads.heads:
            heads.add_head(name, spec.kind, spec.num_labels, label_names=spec.label_names,
                           pooling=spec.pooling or "auto", dropout=spec.dropout)
        elif (heads.specs[name].kind, heads.specs[name].num_labels) != (spec.kind, spec.num_labels):
            raise ModelError(f"head {name!r} is {heads.specs[name].kind} with {heads.specs[name].num_labels} outputs "
                             f"here but {spec.kind} with {spec.num_labels} in {directory}")
    state = load_file(str(directory / HEADS_WEIGHTS))
    result = heads.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ModelError(f"{HEADS_WEIGHTS} in {directory} does not match its {HEADS_CONFIG}: {result.unexpected_keys[0]}")
    if record.get("active_head") in heads.heads:
        heads.active_head = record["active_head"]
    return heads
