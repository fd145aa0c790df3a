"""Spectral measurements of weight matrices."""

from __future__ import annotations

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
