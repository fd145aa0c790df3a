"""Fresh draws of a fixed weight W0 for pretraining from scratch (POET paper, Table 5)."""

from __future__ import annotations

import torch

INITIALIZATIONS = ("normalized_gaussian", "uniform_spectrum", "xavier")


def initial_weight(kind: str, out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A float32 (out, in) weight drawn as 'normalized_gaussian', 'uniform_spectrum' or 'xavier'."""
    if kind == "normalized_gaussian":
        # LLaMA's default N(0, 0.02) with every neuron (row) rescaled to unit norm: the paper's default.
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        return weight / weight.norm(dim=1, keepdim=True)
    if kind == "uniform_spectrum":
        # A Gaussian matrix with all singular values set to 1.
        u, _, vh = torch.linalg.svd(torch.randn(out_features, in_features, generator=generator), full_matrices=False)
        return u @ vh
    if kind == "xavier":
        bound = (6.0 / (in_features + out_features)) ** 0.5
        return (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
    raise ValueError(f"Unknown W0 initialisation {kind!r}; valid: {', '.join(map(repr, INITIALIZATIONS))}.")
