"""E4 (seed 002): after a warm-up, split each target weight into W = R + U·C·Vᵀ along its top-k singular directions.

U and V are frozen, C (k×k, initially diag(S_k)) trains at its own higher learning rate, and R, the residual,
trains with its gradient projected off the U–V block, G_R ← G_R − U(UᵀG_R V)Vᵀ, so that the block is learned only
through C. The split leaves the model's function unchanged. `fold_principal` turns the layers back into plain
Linear layers holding R + U·C·Vᵀ.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Literal, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from .guards import raise_if_tied
from .ops.orthogonal import random_orthogonal
from .ops.seeding import seeded_generator
from .ops.spectral import subspace_component, top_singular

SUBSPACES = ("svd", "random")


def matching_linears(model: nn.Module, targets: Union[str, Iterable[str]]) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers whose names end in one of `targets` (after a dot), or fully match a regex string."""
    if isinstance(targets, str):
        pattern = re.compile(targets)
        matches = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    else:
        suffixes = tuple(targets)
        matches = lambda name: any(name == s or name.endswith("." + s) for s in suffixes)  # noqa: E731
    return [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear and matches(name)]


class PrincipalLinear(nn.Module):
    """A Linear layer reparameterised as W = R + U·C·Vᵀ: R in `residual.weight`, C in `core`, U and V frozen.

    `residual` is the original nn.Linear, its weight overwritten in place by R, so an optimizer that held W keeps
    the same parameter (and its state) as R.
    """

    def __init__(self, linear: nn.Linear, left: torch.Tensor, core: torch.Tensor, right: torch.Tensor):
        super().__init__()
        self.residual = linear
        weight = linear.weight
        # U, V and C in float32 whatever the weight's dtype, as the rotations elsewhere: a bf16 U would make the
        # projection below inexact at the 1e-2 level.
        self.register_buffer("principal_u", left.to(weight.device, torch.float32))
        self.register_buffer("principal_v", right.to(weight.device, torch.float32))
        self.core = nn.Parameter(core.to(weight.device, torch.float32))
        # A frozen W stays frozen as R: nothing to project then.
        self._projection = weight.register_hook(self.project_residual_gradient) if weight.requires_grad else None

    @property
    def in_features(self) -> int:
        """Input size, as nn.Linear has it."""
        return self.residual.in_features

    @property
    def out_features(self) -> int:
        """Output size, as nn.Linear has it."""
        return self.residual.out_features

    def project_residual_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """G_R − U(UᵀG_R V)Vᵀ: R's gradient with the U–V block, which C learns, taken out (computed in float32)."""
        inside = subspace_component(grad.float(), self.principal_u, self.principal_v)
        return (grad.float() - inside).to(grad.dtype)

    def effective_weight(self) -> torch.Tensor:
        """The effective weight R + U·C·Vᵀ, in float32."""
        return self.residual.weight.float() + self.principal_u @ self.core @ self.principal_v.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """R·x + U·C·Vᵀ·x (+ bias), with the low-rank part applied as three thin products."""
        left, core, right = (t.to(x.dtype) for t in (self.principal_u, self.core, self.principal_v))
        principal = F.linear(F.linear(F.linear(x, right.t()), core), left)
        return self.residual(x) + principal

    def fold(self) -> nn.Linear:
        """The plain Linear layer holding R + U·C·Vᵀ (its weight is the residual's parameter, updated in place)."""
        if self._projection is not None:
            self._projection.remove()
        with torch.no_grad():
            self.residual.weight.copy_(self.effective_weight())
        return self.residual


def principal_layers(model: nn.Module) -> Iterator[PrincipalLinear]:
    """Every E4-split layer in a model."""
    return (module for module in model.modules() if isinstance(module, PrincipalLinear))


def principal_cores(model: nn.Module) -> list[nn.Parameter]:
    """The k×k cores C of every E4-split layer: what trains at the higher learning rate."""
    return [layer.core for layer in principal_layers(model)]


def _split(name: str, weight: torch.Tensor, k: int, subspace: str, seed: int):
    # `weight` in float64; C = diag(S_k) for 'svd', C = UᵀWV for 'random' (so both preserve W exactly).
    if subspace == "svd":
        left, values, right = top_singular(weight, k)
        return left, torch.diag(values), right
    generator = seeded_generator(seed, name, "principal")
    left = random_orthogonal(weight.shape[0], k, generator)
    right = random_orthogonal(weight.shape[1], k, generator)
    return left, left.t() @ weight @ right, right


@torch.no_grad()
def extract_principal(
    model: nn.Module,
    k: int,
    targets: Union[str, Iterable[str]],
    subspace: Literal["svd", "random"] = "svd",
    seed: int = 0,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> list[str]:
    """Split each target Linear into W = R + U·C·Vᵀ along a k-dimensional subspace; returns the split layers' names.

    `subspace="svd"` takes W's exact top-k singular vectors (E4); "random" a random orthonormal U, V drawn from
    `seed` (control B2). Given the `optimizer` that trained W, R's Adam first moment is projected as its gradient
    will be, so the warm-up momentum does not keep pushing R into the block. Add the new cores to the optimizer
    afterwards (`principal_cores`, `add_param_group`).
    """
    if subspace not in SUBSPACES:
        raise ValueError(f"extract_principal: subspace={subspace!r} is not valid; use 'svd' or 'random'.")
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"extract_principal: k={k!r} must be an integer rank ≥ 1.")
    found = matching_linears(model, targets)
    if not found:
        names = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if type(m) is nn.Linear})
        form = (
            " A string is a regex that must match a module's whole name (e.g. '.*q_proj'); pass names as a list "
            f"(e.g. [{targets!r}])."
            if isinstance(targets, str)
            else ""
        )
        raise ValueError(
            f"extract_principal: no nn.Linear layer matches targets={targets!r}.{form} This model's are named: "
            f"{', '.join(names) or '(none)'}."
        )
    for name, linear in found:
        raise_if_tied(model, f"{name}.weight", linear.weight, "extract_principal")
        if not 1 <= k <= min(linear.weight.shape):
            raise ValueError(
                f"extract_principal: k={k} does not fit {name} ({linear.out_features}×{linear.in_features}); "
                f"use 1 ≤ k ≤ {min(linear.weight.shape)}."
            )
    for name, linear in found:
        weight = linear.weight.detach().double().cpu()
        left, core, right = _split(name, weight, k, subspace, seed)
        linear.weight.copy_(weight - left @ core @ right.t())
        layer = PrincipalLinear(linear, left, core, right)
        momentum = optimizer.state.get(linear.weight, {}).get("exp_avg") if optimizer is not None else None
        if momentum is not None:
            momentum.copy_(layer.project_residual_gradient(momentum))
        _replace_module(model, name, layer)
    return [name for name, _ in found]


def fold_principal(model: nn.Module) -> int:
    """Turn every E4-split layer back into a plain nn.Linear holding R + U·C·Vᵀ; returns how many were folded."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, PrincipalLinear)]
    for name, layer in found:
        _replace_module(model, name, layer.fold())
    return len(found)


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
