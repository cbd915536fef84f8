"""Distillation losses: each equation against a hand computation, the invariances the papers claim,
and generalized JSD against TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` called directly (a static
method: no trainer is built)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from tunelab.distill import losses as L

torch.manual_seed(0)

# A 2 × 3 pair of distributions small enough to sum by hand: one sequence of two positions, V = 3.
STUDENT_LOGITS = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])  # (B=1, T=2, V=3)
TEACHER_LOGITS = torch.tensor([[[2.0, -1.0, 0.0], [0.0, 1.0, 1.0]]])


def _softmax_rows(logits, temperature=1.0):
    """Softmax by explicit exponentials and sums, as a list of rows."""
    rows = []
    for row in logits.reshape(-1, logits.shape[-1]).tolist():
        exps = [math.exp(z / temperature) for z in row]
        rows.append([e / sum(exps) for e in exps])
    return rows


def _hand_kl(p_rows, q_rows):
    """KL(p ‖ q) per row, by explicit sums."""
    return [
        sum(p * math.log(p / q) for p, q in zip(pr, qr, strict=True))
        for pr, qr in zip(p_rows, q_rows, strict=True)
    ]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_equal_explicit_sums_times_t_squared(temperature):
    p_teacher = _softmax_rows(TEACHER_LOGITS, temperature)
    p_student = _softmax_rows(STUDENT_LOGITS, temperature)
    forward = sum(_hand_kl(p_teacher, p_student)) / 2 * temperature**2
    reverse = sum(_hand_kl(p_student, p_teacher)) / 2 * temperature**2
    assert L.forward_kl(STUDENT_LOGITS, TEACHER_LOGITS, temperature).item() == pytest.approx(
        forward, rel=1e-6
    )
    assert L.reverse_kl(STUDENT_LOGITS, TEACHER_LOGITS, temperature).item() == pytest.approx(
        reverse, rel=1e-6
    )


def test_total_variation_equals_half_l1_distance():
    p_teacher, p_student = _softmax_rows(TEACHER_LOGITS), _softmax_rows(STUDENT_LOGITS)
    hand = [
        0.5 * sum(abs(a - b) for a, b in zip(t, s, strict=True))
        for t, s in zip(p_teacher, p_student, strict=True)
    ]
    assert L.total_variation(STUDENT_LOGITS, TEACHER_LOGITS).item() == pytest.approx(sum(hand) / 2, rel=1e-6)


def test_generalized_jsd_endpoints_and_midpoint_by_hand():
    p_teacher, p_student = _softmax_rows(TEACHER_LOGITS), _softmax_rows(STUDENT_LOGITS)
    beta = 0.3
    mixture = [
        [beta * t + (1 - beta) * s for t, s in zip(tr, sr, strict=True)]
        for tr, sr in zip(p_teacher, p_student, strict=True)
    ]
    hand = [
        beta * a + (1 - beta) * b
        for a, b in zip(_hand_kl(p_teacher, mixture), _hand_kl(p_student, mixture), strict=True)
    ]
    # no mask: "batchmean" divides the sum over (T, V) by B = 1
    assert L.generalized_jsd(STUDENT_LOGITS, TEACHER_LOGITS, beta=beta).item() == pytest.approx(
        sum(hand), rel=1e-6
    )
    assert L.generalized_jsd(STUDENT_LOGITS, TEACHER_LOGITS, beta=0.0).item() == pytest.approx(
        sum(_hand_kl(p_teacher, p_student)), rel=1e-6
    )
    assert L.generalized_jsd(STUDENT_LOGITS, TEACHER_LOGITS, beta=1.0).item() == pytest.approx(
        sum(_hand_kl(p_student, p_teacher)), rel=1e-6
    )


@pytest.mark.parametrize(
    "loss", [L.forward_kl, L.reverse_kl, L.total_variation, L.generalized_jsd], ids=lambda f: f.__name__
)
def test_response_losses_are_zero_when_student_equals_teacher(loss):
    logits = torch.randn(2, 4, 7)
    assert loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_forward_kl_t_squared_keeps_gradient_scale():
    """At high T, ∂KL/∂z_S ≈ (p_S − p_T)/T ≈ (z_S − z_T)/(V T²) for zero-mean logits, so T²·KL has a
    T-independent gradient; without the factor it would shrink by 1/T² (Hinton et al. 2015, §2.1)."""
    generator = torch.Generator().manual_seed(0)  # fixed logits: the 5% bound depends on their spread
    teacher = torch.randn(1, 1, 8, generator=generator)
    teacher = teacher - teacher.mean()
    student_base = torch.randn(1, 1, 8, generator=generator)
    student_base = student_base - student_base.mean()
    norms = []
    for temperature in (10.0, 40.0):
        student = student_base.clone().requires_grad_(True)
        L.forward_kl(student, teacher, temperature).backward()
        norms.append(student.grad.norm().item())
    expected = ((student_base - teacher) / 8).norm().item()  # the T → ∞ limit
    assert norms[0] == pytest.approx(expected, rel=0.05)
    assert norms[1] == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("loss", [L.forward_kl, L.reverse_kl, L.total_variation], ids=lambda f: f.__name__)
def test_masked_positions_are_ignored(loss):
    student, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    masked_loss = loss(student, teacher, mask=mask)
    scrambled_student, scrambled_teacher = student.clone(), teacher.clone()
    scrambled_student[mask == 0] = 100 * torch.randn_like(scrambled_student[mask == 0])
    scrambled_teacher[mask == 0] = 0.0
    assert loss(scrambled_student, scrambled_teacher, mask=mask).item() == pytest.approx(
        masked_loss.item(), rel=1e-6
    )
    per_position = loss(student, teacher, reduction="none")  # (B, T)
    assert masked_loss.item() == pytest.approx(per_position[mask.bool()].mean().item(), rel=1e-6)


def test_hard_label_ce_and_alpha_mixing():
    labels = torch.tensor([[0, L.IGNORE_INDEX]])
    hand = -math.log(_softmax_rows(STUDENT_LOGITS)[0][0])  # only position 0 is scored
    ce = L.hard_label_ce(STUDENT_LOGITS, labels)
    assert ce.item() == pytest.approx(hand, rel=1e-6)
    kd = torch.tensor(2.0)
    assert L.mix_with_hard_labels(ce, kd, alpha=0.25).item() == pytest.approx(
        0.25 * hand + 0.75 * 2.0, rel=1e-6
    )
    assert L.mix_with_hard_labels(ce, kd, alpha=1.0).item() == pytest.approx(hand, rel=1e-6)


# ---- TRL parity ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_generalized_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss  # a @staticmethod: callable on the class


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_generalized_jsd_equals_trl_gkd(trl_generalized_jsd, beta, temperature, masked):
    generator = torch.Generator().manual_seed(7)
    student = 3 * torch.randn(3, 6, 11, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(3, 6, 11, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6), generator=generator)
    if masked:
        labels[0, :2] = -100
        labels[2, 4:] = -100
    trl_labels = labels if masked else None
    for reduction in ("batchmean", "sum", "mean"):
        expected = trl_generalized_jsd(
            student, teacher, labels=trl_labels, beta=beta, temperature=temperature, reduction=reduction
        )
        ours = L.generalized_jsd(
            student, teacher, beta=beta, temperature=temperature, labels=trl_labels, reduction=reduction
        )
        assert ours.item() == pytest.approx(expected.item(), abs=1e-6, rel=1e-6), reduction
    # float32, the dtype training uses
    expected = trl_generalized_jsd(
        student.float(), teacher.float(), labels=trl_labels, beta=beta, temperature=temperature
    )
    ours = L.generalized_jsd(
        student.float(), teacher.float(), beta=beta, temperature=temperature, labels=trl_labels
    )
    assert abs(ours.item() - expected.item()) <= 1e-6


# ---- feature-based ------------------------------------------------------------------------------


def test_hidden_mse_and_cosine_by_hand_with_mask():
    student = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # (1, 3, 2)
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [-5.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert L.hidden_mse(student, teacher, mask=mask).item() == pytest.approx(((1 + 0) / 2 + (0 + 1) / 2) / 2)
    # cosine: position 0 has a zero teacher vector -> cos = 0; position 1 is parallel -> cos = 1
    assert L.hidden_cosine(student, teacher, mask=mask).item() == pytest.approx(
        ((1 - 0) + (1 - 1)) / 2, abs=1e-6
    )
    assert L.hidden_mse(student, student).item() == 0.0
    assert L.hidden_cosine(student, 3 * student).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_projector_maps_widths_and_trains():
    projector = L.FeatureProjector({"layers.1->layers.3": (4, 6), "layers.2->layers.5": (6, 6)})
    assert isinstance(projector.projections["layers__2->layers__5"], torch.nn.Identity)
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="projection"):
        L.hidden_mse(student, teacher)
    loss = L.hidden_mse(student, teacher, projection=lambda h: projector("layers.1->layers.3", h))
    loss.backward()
    linear = projector.projections["layers__1->layers__3"]
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert set(projector.state_dict()) == {
        "projections.layers__1->layers__3.weight",
        "projections.layers__1->layers__3.bias",
    }


def test_attention_transfer_is_mse_over_valid_query_key_pairs():
    student, teacher = torch.rand(2, 2, 3, 3), torch.rand(2, 2, 3, 3)
    assert L.attention_transfer(student, teacher).item() == pytest.approx(
        F.mse_loss(student, teacher).item(), rel=1e-6
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    hand = torch.cat(
        [
            (student[0] - teacher[0]).pow(2).flatten(),
            (student[1, :, :2, :2] - teacher[1, :, :2, :2]).pow(2).flatten(),
        ]
    )
    assert L.attention_transfer(student, teacher, mask).item() == pytest.approx(hand.mean().item(), rel=1e-6)


def test_value_relation_is_kl_between_scaled_dot_product_relations():
    student, teacher = torch.randn(1, 3, 4), torch.randn(1, 3, 8)  # widths differ: relations are 3 × 3
    total = 0.0
    for head in range(2):
        s = student[0, :, head * 2 : (head + 1) * 2]  # (T, d_S = 2)
        t = teacher[0, :, head * 4 : (head + 1) * 4]  # (T, d_T = 4)
        relation_s = _softmax_rows(s @ s.T / math.sqrt(2))
        relation_t = _softmax_rows(t @ t.T / math.sqrt(4))
        total += sum(_hand_kl(relation_t, relation_s))
    assert L.value_relation(student, teacher, num_heads=2).item() == pytest.approx(total / (2 * 3), rel=1e-5)
    assert L.value_relation(teacher, teacher, num_heads=4).item() == pytest.approx(0.0, abs=1e-6)
    # a masked key gets no mass and a masked query is not averaged: equal to the loss on the prefix
    mask = torch.tensor([[1, 1, 0]])
    prefix = L.value_relation(student[:, :2], teacher[:, :2], num_heads=2)
    assert L.value_relation(student, teacher, num_heads=2, mask=mask).item() == pytest.approx(
        prefix.item(), rel=1e-5
    )


# ---- relation-based ------------------------------------------------------------------------------


def test_rkd_distance_by_hand_and_scale_invariant():
    student = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 8.0]])  # distances 5, 8, 5
    teacher = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 3, 2
    s = [d / 6.0 for d in (5.0, 8.0, 5.0)]
    t = [d / 2.0 for d in (1.0, 3.0, 2.0)]

    def huber(x):
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    hand = sum(huber(a - b) for a, b in zip(s, t, strict=True)) / 3  # each pair twice over 6 ordered pairs
    assert L.rkd_distance(student, teacher).item() == pytest.approx(hand, rel=1e-6)
    embeddings_s, embeddings_t = torch.randn(6, 5), torch.randn(6, 9)
    reference = L.rkd_distance(embeddings_s, embeddings_t).item()
    assert L.rkd_distance(7.5 * embeddings_s, 0.1 * embeddings_t).item() == pytest.approx(reference, rel=1e-5)
    assert L.rkd_distance(embeddings_t * 3, embeddings_t).item() == pytest.approx(0.0, abs=1e-6)


def _hand_angles(points):
    """cos of the angle at point i between points j and k, for every (i, j, k); 0 when degenerate."""
    n = len(points)
    cosines = []
    for i in range(n):
        for j in range(n):
            for k in range(n):
                u = [a - b for a, b in zip(points[j], points[i], strict=True)]
                v = [a - b for a, b in zip(points[k], points[i], strict=True)]
                nu, nv = math.hypot(*u), math.hypot(*v)
                cosines.append(
                    0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v, strict=True)) / (nu * nv)
                )
    return cosines


def test_rkd_angle_by_hand_and_similarity_invariant():
    # a right angle at the origin (student) vs a 45° angle (teacher), plus the other two corners
    student = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    teacher = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]

    def huber(x):
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    differences = [a - b for a, b in zip(_hand_angles(student), _hand_angles(teacher), strict=True)]
    hand = sum(huber(d) for d in differences) / 27  # all N³ triplets, as the reference code
    assert L.rkd_angle(torch.tensor(student), torch.tensor(teacher)).item() == pytest.approx(hand, rel=1e-6)
    embeddings = torch.randn(5, 4)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4))
    moved = 3.0 * embeddings @ rotation + 1.5  # scaled, rotated, translated
    assert L.rkd_angle(moved, embeddings).item() == pytest.approx(0.0, abs=1e-6)


def test_similarity_preserving_by_hand():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # G = I, rows already unit
    teacher = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # G = all 2s -> rows (1/√2, 1/√2)
    r = 1 / math.sqrt(2)
    hand = ((1 - r) ** 2 * 2 + r**2 * 2) / 4
    assert L.similarity_preserving(student, teacher).item() == pytest.approx(hand, rel=1e-6)
    batch = torch.randn(4, 2, 3)
    assert L.similarity_preserving(batch, 2 * batch).item() == pytest.approx(0.0, abs=1e-6)


# ---- combination and schedules -------------------------------------------------------------------


def test_combine_weights_terms_and_logs_unweighted_values():
    kd = torch.tensor(2.0, requires_grad=True)
    ce = torch.tensor(3.0, requires_grad=True)
    total, metrics = L.combine({"kd": (0.5, kd), "ce": (0.25, ce)})
    assert total.item() == pytest.approx(0.5 * 2 + 0.25 * 3)
    assert metrics == {"kd": 2.0, "ce": 3.0, "loss": pytest.approx(1.75)}
    total.backward()
    assert kd.grad.item() == 0.5 and ce.grad.item() == 0.25


def test_schedules():
    assert L.schedule_value("constant", 4.0, 1.0, 50, 100) == 4.0
    assert L.schedule_value("linear", 4.0, 1.0, 0, 100) == 4.0
    assert L.schedule_value("linear", 4.0, 1.0, 25, 100) == pytest.approx(3.25)
    assert L.schedule_value("linear", 4.0, 1.0, 500, 100) == 1.0
    assert L.schedule_value("cosine", 4.0, 1.0, 50, 100) == pytest.approx(2.5)
    assert L.schedule_value("cosine", 4.0, 1.0, 100, 100) == pytest.approx(1.0)
    assert L.schedule_value("cosine", 0.0, 1.0, 25, 100) == pytest.approx(0.5 - 0.5 * math.cos(math.pi / 4))
    with pytest.raises(ValueError, match="kind"):
        L.schedule_value("step", 1.0, 0.0, 1, 10)
