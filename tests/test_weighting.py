"""Loss weightings: each one's equation checked on hand-made losses and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.multitask.weighting import (
    DWAWeighting,
    EqualWeighting,
    GradNormWeighting,
    PCGradWeighting,
    StaticWeighting,
    UncertaintyWeighting,
    build_weighting,
    dwa_weights,
    gradnorm_loss,
    pcgrad,
    surrogate,
)


def _losses(**values):
    return {name: torch.tensor(value) for name, value in values.items()}


def test_equal_is_the_mean():
    out = EqualWeighting(["a", "b"]).combine(_losses(a=2.0, b=4.0))
    assert out.loss.item() == pytest.approx(3.0)


def test_static_normalised_and_plain():
    losses = _losses(a=2.0, b=4.0)
    assert StaticWeighting(["a", "b"], weights={"a": 3.0}).combine(losses).loss.item() == pytest.approx((6 + 4) / 4)
    plain = StaticWeighting(["a", "b"], weights={"a": 3.0}, normalize=False).combine(losses).loss.item()
    assert plain == pytest.approx(10.0)
    with pytest.raises(ConfigError):
        StaticWeighting(["a"], weights={"z": 1.0})


def test_uncertainty_equation_and_gradient():
    weighting = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        weighting.log_variance["a"].fill_(math.log(4.0))  # σ_a² = 4
    out = weighting.combine(_losses(a=2.0, b=3.0))
    # Σ L_i / (2σ_i²) + log σ_i:  a: 2/8 + log 2;  b: 3/2 + 0
    assert out.loss.item() == pytest.approx(2 / 8 + math.log(2.0) + 3 / 2, rel=1e-6)
    out.loss.backward()
    # d/ds (½ e^{-s} L + ½ s) = ½ (1 - e^{-s} L): at s=0, L=3 -> -1
    assert weighting.log_variance["b"].grad.item() == pytest.approx(-1.0)


def test_dwa_weights_equation_and_history():
    weights = dwa_weights({"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 2.0}, temperature=2.0)  # r = 0.5, 1.0
    ea, eb = math.exp(0.25), math.exp(0.5)
    assert weights["a"] == pytest.approx(2 * ea / (ea + eb))
    assert weights["b"] == pytest.approx(2 * eb / (ea + eb))
    dwa = DWAWeighting(["a", "b"], temperature=2.0, period=1)
    for a, b in [(2.0, 2.0), (1.0, 2.0)]:  # two periods: then w follows the ratios above
        assert dwa.combine(_losses(a=a, b=b)).metrics["w/a"] == pytest.approx(0.5)
    assert dwa.current_weights()["a"] == pytest.approx(weights["a"])
    restored = DWAWeighting(["a", "b"], period=1)
    restored.load_extra_state(dwa.extra_state())
    assert restored.current_weights() == dwa.current_weights()


def test_gradnorm_loss_equation():
    weights = torch.tensor([1.0, 1.0], requires_grad=True)
    norms, ratios = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.5])
    loss = gradnorm_loss(weights, norms, ratios, alpha=1.0)
    # G = (2, 1), mean 1.5; r = L̃ / mean L̃ = (4/3, 2/3); targets (2, 1) -> |2-2| + |1-1| = 0
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss = gradnorm_loss(weights, norms, torch.tensor([1.0, 1.0]), alpha=1.0)  # targets 1.5, 1.5
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert weights.grad.tolist() == pytest.approx([2.0, -1.0])  # sign(G_i - t_i) * ||g_i||


def test_gradnorm_updates_weights_not_network_through_l_grad():
    theta = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    weighting = GradNormWeighting(["a", "b"], alpha=1.0)
    losses = {"a": (2 * theta).sum(), "b": theta[0] * 1.0}
    out = weighting.combine(losses, [theta])
    assert out.loss.item() == pytest.approx((4.0 + 1.0) / 2)  # value: Σ w L / K with w = 1
    out.loss.backward()
    assert theta.grad.tolist() == pytest.approx([(2 + 1) / 2, 2 / 2])  # Σ w ∇L / K only
    assert weighting.weight["a"].grad.item() != 0.0


def test_pcgrad_projection_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # conflict: g1·g2 = -1
    p1, p2 = pcgrad([g1, g2], orders=[[1], [0]])
    assert p1.tolist() == pytest.approx([0.5, 0.5])  # g1 - (-1/2) g2
    assert p2.tolist() == pytest.approx([0.0, 1.0])  # g2 - (-1/1) g1
    assert torch.dot(p1, g2).item() == pytest.approx(0.0)
    same = pcgrad([g1, torch.tensor([1.0, 1.0])])  # no conflict: unchanged
    assert same[0].tolist() == [1.0, 0.0]


def test_pcgrad_surrogate_gradient_is_the_projected_mean():
    theta = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    head = torch.nn.Parameter(torch.tensor(1.0))  # task-specific: keeps its plain gradient
    losses = {"a": theta[0] * 1.0 + head * 2.0, "b": -theta[0] + theta[1]}
    out = PCGradWeighting(["a", "b"]).combine(losses, [theta])
    assert out.loss.item() == pytest.approx(1.0)  # value: the plain mean (2 + 0) / 2
    out.loss.backward()
    assert theta.grad.tolist() == pytest.approx([(0.5 + 0.0) / 2, (0.5 + 1.0) / 2])
    assert head.grad.item() == pytest.approx(1.0)


def test_surrogate_value_and_gradient():
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    plain = (theta**2).sum()
    loss = surrogate(plain, [theta], torch.tensor([2.0, 4.0]), torch.tensor([7.0, -1.0]))
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    assert theta.grad.tolist() == pytest.approx([7.0, -1.0])


def test_build_weighting_rejects_unknown_names_and_options():
    assert isinstance(build_weighting("pcgrad", ["a"]), PCGradWeighting)
    with pytest.raises(ConfigError, match="unknown weighting"):
        build_weighting("magic", ["a"])
    with pytest.raises(ConfigError, match="alpah"):
        build_weighting("gradnorm", ["a"], {"alpah": 1.0})
