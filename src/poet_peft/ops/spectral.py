"""Spectral measurements of weight matrices."""

from __future__ import annotations

from typing import Optional

import torch


def singular_value_drift(reference: torch.Tensor, current: torch.Tensor, floor: float = 0.0) -> float:
    """Largest relative change of a singular value: max |σᵢ − σᵢ⁰| / σᵢ⁰ over the σᵢ⁰ ≥ floor·σ_max⁰.

    Both arguments are singular values sorted in descending order (torch.linalg.svdvals). With floor=1 the
    change of every σᵢ is measured against σ_max⁰ instead (the normwise drift, which Weyl's inequality bounds
    by ‖ΔW‖₂/‖W‖₂); a floor below 1 excludes near-null directions, whose relative change is dominated by
    rounding at ε·σ_max/σᵢ.
    """
    reference, current = reference.double(), current.double()
    change = (current - reference).abs()
    if floor >= 1:
        return (change.max() / reference[0]).item()
    kept = reference >= floor * reference[0]
    return (change[kept] / reference[kept]).max().item()


def low_rank_spectral_norm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """σ_max(left·right) of an (m, r)·(r, n) product, exactly, from r×r factors and never the dense m×n matrix.

    With left = Q_L·R_L and rightᵀ = Q_R·R_R (thin QR), left·right = Q_L·(R_L·R_Rᵀ)·Q_Rᵀ, and Q_L, Q_R have
    orthonormal columns, so the product's singular values are those of the r×r core R_L·R_Rᵀ. Float64 throughout.
    """
    left_r = torch.linalg.qr(left.double()).R
    right_r = torch.linalg.qr(right.double().t()).R
    return torch.linalg.matrix_norm(left_r @ right_r.t(), ord=2)


def top_singular(
    matrix: torch.Tensor, k: int, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets (U: (m, k), S: (k,), V: (n, k)) of a matrix, in float64.

    Exact (a full SVD) unless a `generator` is given and the matrix is larger than 1024 on a side; then a
    randomized SVD drawn from that generator (k + 10 columns, 4 power iterations), which recovers the leading
    triplets when the spectrum decays but only approximates them on a flat one.
    """
    matrix = matrix.detach().double()
    if generator is None or max(matrix.shape) <= 1024:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].t()
    # Halko–Martinsson–Tropp range finder with re-orthonormalised power iterations, on a CPU generator so that it
    # never touches the global RNG that dropout and data order draw from.
    sketch = torch.randn(matrix.shape[1], min(k + 10, *matrix.shape), generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(matrix @ sketch.to(matrix.device)).Q
    for _ in range(4):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.t() @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.t() @ matrix, full_matrices=False)
    return (basis @ u)[:, :k], s[:k], vh[:k].t()


def principal_cosines(basis: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spans of two orthonormal bases, largest first."""
    return torch.linalg.svdvals(basis.double().t() @ other.double()).clamp(max=1.0)


def subspace_component(matrix: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """U·(Uᵀ·G·V)·Vᵀ: the part of G inside the span of the orthonormal columns U (left) and V (right)."""
    return left @ (left.t() @ matrix @ right) @ right.t()


def projection_energy(matrix: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """p = ‖Uᵀ·G·V‖_F² / ‖G‖_F²: the share of G's energy inside the U–V block (0 for G = 0)."""
    matrix = matrix.double()
    total = matrix.square().sum()
    inside = (left.double().t() @ matrix @ right.double()).square().sum()
    return (inside / total).item() if total > 0 else 0.0


def hyperspherical_energy(matrix: torch.Tensor, rows_per_chunk: int = 1024) -> float:
    """HE(W) = Σ_{i≠j} ‖ŵᵢ − ŵⱼ‖⁻¹ over W's rows normalised to unit length, in float64 (POET's and OFT's measure).

    Unchanged by any rotation applied to all rows alike (W·Q for orthogonal Q). Distances come from the Gram matrix,
    ‖ŵᵢ − ŵⱼ‖² = ‖ŵᵢ‖² + ‖ŵⱼ‖² − 2·ŵᵢ·ŵⱼ, a block of rows at a time, so memory stays at rows_per_chunk × rows.
    Coincident rows make the energy infinite; a zero row stays the zero vector.
    """
    rows = matrix.detach().double()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    squared_norms = rows.square().sum(dim=1)
    energy = rows.new_zeros(())
    for start in range(0, rows.shape[0], rows_per_chunk):
        chunk = rows[start : start + rows_per_chunk]
        squared = squared_norms[start : start + rows_per_chunk, None] + squared_norms[None] - 2 * chunk @ rows.t()
        squared = squared.clamp_min(0)
        # Pair (i, i) is not a pair: mask the diagonal of this block out rather than let it add 1/0.
        squared[torch.arange(chunk.shape[0]), torch.arange(start, start + chunk.shape[0])] = float("inf")
        energy += squared.rsqrt().sum()
    return energy.item()
