"""Compacter: bottleneck adapters whose projections are low-rank hypercomplex layers.

Karimi Mahabadi, Henderson, Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers",
NeurIPS 2021, arXiv:2106.04647. A parameterized hypercomplex multiplication (PHM) layer builds its
``k × d`` weight as a sum of Kronecker products, and Compacter makes each factor cheap:

    W = Σ_{i=1..n} A_i ⊗ B_i,     A_i ∈ ℝ^{n×n}   ("slow" weights, shared by every adapter layer)
                                  B_i = s_i t_iᵀ  ("fast" weights, per layer, rank r: s_i ∈ ℝ^{k/n×r}, t_i ∈ ℝ^{d/n×r})
    y = W x + b

One LPHM layer holds ``r (k + d)`` parameters (plus the bias) instead of ``k d``; the ``n`` matrices
``A_i`` (``n³`` numbers) are shared across all layers. With a down and an up projection per adapter,
``L`` blocks and adapters after attention and feed-forward (**Compacter**), the trainable count is
(paper, §3, rank one, biases left out)

    n³ + 4 L (k + d)              Compacter
    n³ + 2 L (k + d)              Compacter++ (feed-forward placement only)

and with rank ``r`` and biases ``n³ + P L (2 r (k + d) + (k + d))`` for ``P`` adapters per block.

How the code maps to it: :class:`PHMLinear` holds ``rule`` (the ``A_i`` stack ``(n, n, n)``, the same
``nn.Parameter`` object in every layer of one adapter when ``shared_phm_rule``), ``s`` ``(n, k/n, r)``
and ``t`` ``(n, d/n, r)``; ``weight()`` forms ``Σ_i kron(A_i, s_i t_iᵀ)``. :class:`CompacterAdapter`
is ``up(act(down(h)))``; it is inserted by the generic mechanism of ``bottleneck.py`` (Houlsby
placement for ``variant="compacter"``, Pfeiffer for ``"compacter++"``), so AdapterDrop, several named
adapters and save/load work the same. ``s`` of the up projection starts at zero: identity at init.
Saving stores the shared ``rule`` once (:func:`adapter_state`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.errors import MethodError
from tunelab.tuners.adapters import bottleneck
from tunelab.tuners.adapters.bottleneck import ACTIVATIONS, AdapterPlacementConfig
from tunelab.tuners.base import layer_adapter_state

PLACEMENT = {"compacter": "houlsby", "compacter++": "pfeiffer"}


class CompacterConfig(AdapterPlacementConfig):
    """Compacter options (AdapterHub's names)."""

    method = "compacter"

    variant: Literal["compacter", "compacter++"] = "compacter"
    """compacter: adapters after attention and feed-forward; compacter++: after the feed-forward only."""
    reduction_factor: float = Field(32.0, gt=0)
    """Bottleneck width k = hidden / reduction_factor (must be a multiple of phm_dim)."""
    phm_dim: int = Field(4, gt=0)
    """n: the number of Kronecker summands and the size of each A_i."""
    phm_rank: int = Field(1, gt=0)
    """r: the rank of each fast weight B_i = s_i t_iᵀ (the paper uses 1)."""
    phm_bias: bool = True
    """A bias in every PHM layer (the paper's parameter formula leaves biases out)."""
    shared_phm_rule: bool = True
    """Share the A_i across all layers of the adapter (Compacter); False: one set per layer (PHM-Adapter)."""
    non_linearity: Literal["relu", "gelu", "swish", "silu", "tanh", "identity"] = "gelu"
    """The activation between the down and up projections."""


def new_rule(n: int) -> nn.Parameter:
    """The slow weights ``A_i`` as ``(n, n, n)``; std 1/sqrt(n) keeps ``Σ_i A_i ⊗ B_i`` at the scale of ``B``."""
    return nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))


class PHMLinear(nn.Module):
    """``y = (Σ_i A_i ⊗ s_i t_iᵀ) x + b``: a ``d -> k`` layer with ``r (k + d)`` own parameters."""

    def __init__(self, in_features: int, out_features: int, rule: nn.Parameter, rank: int, bias: bool,
                 zero_init: bool = False) -> None:
        super().__init__()
        n = rule.shape[0]
        self.in_features, self.out_features, self.n = in_features, out_features, n
        self.rule = rule  # (n, n, n): possibly the same Parameter object in every layer
        self.s = nn.Parameter(torch.empty(n, out_features // n, rank))  # (n, k/n, r)
        self.t = nn.Parameter(torch.empty(n, in_features // n, rank))  # (n, d/n, r)
        nn.init.xavier_normal_(self.t)
        if zero_init:
            nn.init.zeros_(self.s)  # W = 0 until s moves: the adapter starts as the identity
        else:
            nn.init.xavier_normal_(self.s)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def weight(self) -> torch.Tensor:
        """``Σ_i kron(A_i, s_i t_iᵀ)`` as ``(out, in)``."""
        fast = self.s @ self.t.transpose(1, 2)  # (n, k/n, d/n)
        n, rows, cols = fast.shape
        # kron(A_i, B_i)[a*rows + p, b*cols + q] = A_i[a, b] * B_i[p, q], summed over i
        kron = torch.einsum("iab,ipq->apbq", self.rule, fast)  # (n, k/n, n, d/n)
        return kron.reshape(n * rows, n * cols)  # (k, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)  # (..., d) -> (..., k)


class CompacterAdapter(nn.Module):
    """``delta(h) = up(act(down(h)))`` with PHM projections ``d -> k -> d``."""

    def __init__(self, hidden: int, width: int, config: CompacterConfig, rule: nn.Parameter | None) -> None:
        super().__init__()
        down_rule = rule if rule is not None else new_rule(config.phm_dim)
        up_rule = rule if rule is not None else new_rule(config.phm_dim)
        self.down = PHMLinear(hidden, width, down_rule, config.phm_rank, config.phm_bias)
        self.activation = ACTIVATIONS[config.non_linearity]()
        self.up = PHMLinear(width, hidden, up_rule, config.phm_rank, config.phm_bias, zero_init=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.activation(self.down(h)))  # (..., d)


def width(hidden: int, config: CompacterConfig) -> int:
    """The bottleneck k; MethodError unless both k and the hidden size are multiples of phm_dim."""
    k = bottleneck.bottleneck_width(hidden, config.reduction_factor)
    n = config.phm_dim
    if hidden % n or k % n:
        raise MethodError(f"Compacter needs hidden size ({hidden}) and bottleneck ({k} = hidden / reduction_factor) "
                          f"divisible by phm_dim={n}; change phm_dim or reduction_factor")
    return k


def inject(model: nn.Module, config: CompacterConfig, adapter_name: str) -> list[str]:
    """Add Compacter adapter ``adapter_name``; returns the wrapped paths."""
    shared: list[nn.Parameter] = []  # the one A stack, created with the first adapter (on its device)

    def make(hidden: int, position: str) -> CompacterAdapter:
        if config.shared_phm_rule and not shared:
            shared.append(new_rule(config.phm_dim))
        return CompacterAdapter(hidden, width(hidden, config), config, shared[0] if shared else None)

    positions = bottleneck.POSITIONS[PLACEMENT[config.variant]]
    return bottleneck.insert(model, config, adapter_name, positions, make)


def adapter_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The wrappers' tensors with the shared ``rule`` listed once (under its first layer's path)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # storage addresses: state_dict() detaches, so the shared rule is a new view each time
    for key, tensor in layer_adapter_state(model, adapter_name).items():
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor
    return state


def expected_parameter_count(hidden: int, num_blocks: int, config: CompacterConfig) -> int:
    """The paper's count for this configuration (the test compares it with the model's)."""
    n, r, k, d = config.phm_dim, config.phm_rank, width(hidden, config), hidden
    per_block = len(bottleneck.POSITIONS[PLACEMENT[config.variant]])
    rules = n**3 if config.shared_phm_rule else 2 * per_block * num_blocks * n**3
    per_adapter = 2 * r * (k + d) + ((k + d) if config.phm_bias else 0)
    return rules + per_block * num_blocks * per_adapter
