"""Relation-based distillation: the student keeps the teacher's geometry of a batch.

The inputs are the batch's pooled representations, (N, D_S) and (N, D_T): the widths may differ,
because only relations between examples are compared (N × N distances, N × N × N angles, N × N
similarities). The teacher is detached.

- RKD distance and angle (Park et al. 2019, "Relational Knowledge Distillation", arXiv:1904.05068),
  following the authors' reference code (github.com/lenscloth/RKD, ``metric/loss.py``).
- Similarity-preserving KD (Tung & Mori 2019, arXiv:1907.09682).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    squared = (embeddings[:, None, :] - embeddings[None, :, :]).pow(2).sum(-1)  # (N, N)
    return squared.clamp_min(1e-12).sqrt() * (1 - torch.eye(len(embeddings), device=embeddings.device))


def _normalised_distances(embeddings: torch.Tensor) -> torch.Tensor:
    distances = _pairwise_distances(embeddings.float())  # (N, N), zero diagonal
    off_diagonal = distances[~torch.eye(len(distances), dtype=torch.bool, device=distances.device)]
    return distances / off_diagonal.mean().clamp_min(1e-12)


def rkd_distance(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss.

        ψ_D(t_i, t_j) = ‖t_i − t_j‖ / μ,    μ = mean over pairs i ≠ j of ‖t_i − t_j‖
        L = mean over i ≠ j of Huber(ψ_D(s_i, s_j) − ψ_D(t_i, t_j))      (Huber = smooth L1, δ = 1)

    Dividing by μ makes the loss invariant to a global rescaling of either embedding space. (The
    reference code averages over all N² entries, diagonal zeros included; this averages over the
    N(N−1) off-diagonal pairs, the same loss times N / (N−1).)

    Args:
        student_embeddings: (N, D_S), N >= 2.
        teacher_embeddings: (N, D_T).
    """
    if len(student_embeddings) < 2:
        raise ValueError("rkd_distance needs at least 2 examples")
    student = _normalised_distances(student_embeddings)  # (N, N)
    teacher = _normalised_distances(teacher_embeddings.detach())
    off_diagonal = ~torch.eye(len(student), dtype=torch.bool, device=student.device)
    return F.smooth_l1_loss(student[off_diagonal], teacher[off_diagonal])


def _angles(embeddings: torch.Tensor) -> torch.Tensor:
    differences = embeddings.float()[None, :, :] - embeddings.float()[:, None, :]  # (N, N, D): e_j − e_i
    unit = F.normalize(differences, p=2, dim=2)  # (N, N, D); zero vectors stay zero
    return torch.bmm(unit, unit.transpose(1, 2))  # (N, N, N): cos ∠(e_j − e_i, e_k − e_i)


def rkd_angle(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss.

        ψ_A(t_i, t_j, t_k) = ⟨(t_i − t_j)/‖t_i − t_j‖, (t_k − t_j)/‖t_k − t_j‖⟩    (cosine of the angle at t_j)
        L = mean over all triplets of Huber(ψ_A(s) − ψ_A(t))

    As in the reference code, all N³ triplets enter the mean; degenerate ones (a repeated index)
    give 0 on both sides. Invariant to scaling and translation of either space.

    Args:
        student_embeddings: (N, D_S), N >= 3.
        teacher_embeddings: (N, D_T).
    """
    if len(student_embeddings) < 3:
        raise ValueError("rkd_angle needs at least 3 examples")
    return F.smooth_l1_loss(_angles(student_embeddings), _angles(teacher_embeddings.detach()))


def _similarity(activations: torch.Tensor) -> torch.Tensor:
    flat = activations.float().flatten(1)  # (N, D)
    return F.normalize(flat @ flat.T, p=2, dim=1)  # (N, N), rows L2-normalised


def similarity_preserving(
    student_activations: torch.Tensor, teacher_activations: torch.Tensor
) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019, Eq. 2–4).

        G = row_normalise(A Aᵀ),   A = activations flattened to (N, D)
        L = (1 / N²) ‖G_S − G_T‖_F²

    Args:
        student_activations: (N, ...) for the student; flattened per example.
        teacher_activations: (N, ...) for the teacher.
    """
    count = len(student_activations)
    student = _similarity(student_activations)
    teacher = _similarity(teacher_activations.detach())
    return (student - teacher).pow(2).sum() / count**2
