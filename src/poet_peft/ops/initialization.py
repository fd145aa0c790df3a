"""Fresh weight draws: POET's fixed W0 for pretraining from scratch (paper, Table 5) and ORA's frozen projections."""

from __future__ import annotations

import torch

from .orthogonal import random_orthogonal

INITIALIZATIONS = ("normalized_gaussian", "uniform_spectrum", "xavier")
PROJECTIONS = ("orthogonal", "gaussian")


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


def random_projection(kind: str, out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A float64 (out, in) frozen projection drawn as 'orthogonal' (Haar) or 'gaussian' (i.i.d. N(0, 1/in))."""
    if kind == "orthogonal":
        # More outputs than inputs cannot all be orthonormal: stack independent row-orthonormal draws of at most
        # `in_features` rows, so any head whose rows lie in one stack (head_dim dividing in_features) is still
        # row-orthonormal.
        heights = [min(in_features, out_features - start) for start in range(0, out_features, in_features)]
        return torch.cat([random_orthogonal(height, in_features, generator) for height in heights])
    if kind == "gaussian":
        # Variance 1/in gives every row an expected squared norm of 1, as an orthogonal row has exactly: the
        # ablation changes the distribution, not the scale of the attention logits.
        return torch.randn(out_features, in_features, generator=generator, dtype=torch.float64) / in_features**0.5
    raise ValueError(f"Unknown projection {kind!r}; valid: {', '.join(map(repr, PROJECTIONS))}.")
