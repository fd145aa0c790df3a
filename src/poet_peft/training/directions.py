"""Seed 002's experiment #3: track the top-k subspace of each target's gradient momentum, and optionally amplify it.

Every `every` steps, for each target weight, a top-k SVD of its Adam first moment (exp_avg) G = U·S·Vᵀ gives
- the principal cosines of U and V against the previous measurement (1: the directions stayed put);
- p = ‖UᵀGV‖_F²/‖G‖_F², the share of the momentum's energy in its own top-k block, and p_prev, the share in the
  previous measurement's block (whether yesterday's directions still carry the gradient).
Variant 3B raises the learning rate by α inside the tracked block only: after each optimizer step, the step's
update ΔW gets ΔW ← ΔW + (α−1)·U(UᵀΔW V)Vᵀ. Scaling the gradient instead would not do it under Adam, whose
per-coordinate normalisation mostly cancels a gradient scale.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Union

import torch
from torch import nn

from ..ops.seeding import seeded_generator
from ..ops.spectral import principal_cosines, projection_energy, top_singular
from ..principal import matching_linears


class StableDirections:
    """Measure (and with `amplify` > 1, exploit) the stable top-k directions of target weights' gradient momentum.

    `optimizer` is any optimizer that keeps Adam's `exp_avg` per parameter (torch AdamW/Adam, and Accelerate's
    wrapper of them). Call `after_step(step)` after each optimizer step; it returns the metrics on measurement
    steps, `{}` otherwise. The tracked subspaces are in `state_dict()`, so that a resumed run amplifies exactly
    as an uninterrupted one (`poet_peft.save_state(tracker, folder, name)` into each checkpoint,
    `poet_peft.load_state` on resume).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        targets: Union[str, Iterable[str]],
        k: int = 8,
        every: int = 100,
        amplify: float = 1.0,
    ):
        if every < 1 or k < 1 or amplify <= 0:
            raise ValueError(
                f"StableDirections: every={every}, k={k}, amplify={amplify} are invalid; use every ≥ 1, k ≥ 1 and "
                "amplify > 0 (1 measures only; > 1 is variant 3B)."
            )
        self.optimizer = optimizer
        self.k = k
        self.every = every
        self.amplify = amplify
        self.weights = {name: linear.weight for name, linear in matching_linears(model, targets)}
        if not self.weights:
            raise ValueError(f"StableDirections: no nn.Linear layer matches targets={targets!r}.")
        self.subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._block_before_step: dict[str, torch.Tensor] = {}
        self._hooks = []
        if amplify != 1.0:
            inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper steps the inner optimizer
            self._hooks = [
                inner.register_step_pre_hook(self._remember_weights),
                inner.register_step_post_hook(self._amplify_update),
            ]

    @torch.no_grad()
    def _block(self, name: str) -> torch.Tensor:
        # UᵀWV (k×k): the update's block is its change over a step, so no copy of W is needed.
        left, right = self.subspaces[name]
        return left.t() @ self.weights[name].float() @ right

    def _remember_weights(self, optimizer, args, kwargs) -> None:
        self._block_before_step = {name: self._block(name) for name in self.subspaces}

    @torch.no_grad()
    def _amplify_update(self, optimizer, args, kwargs) -> None:
        for name, before in self._block_before_step.items():
            left, right = self.subspaces[name]
            extra = (self.amplify - 1) * (left @ (self._block(name) - before) @ right.t())
            self.weights[name].add_(extra.to(self.weights[name].dtype))
        self._block_before_step = {}

    def remove(self) -> None:
        """Stop amplifying (remove the optimizer hooks)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        """The tracked subspaces, by module name."""
        return {"subspaces": {name: list(pair) for name, pair in self.subspaces.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the tracked subspaces saved by `state_dict`."""
        self.subspaces = {
            name: tuple(t.to(self.weights[name].device) for t in pair) for name, pair in state["subspaces"].items()
        }

    @torch.no_grad()
    def measure(self, step: int = 0) -> dict[str, float]:
        """Take a new top-k subspace of every target's momentum now; returns the metrics, named `stable/<mod>/...`."""
        metrics = {}
        for name, weight in self.weights.items():
            momentum = self.optimizer.state.get(weight, {}).get("exp_avg")
            if momentum is None:  # not stepped yet
                continue
            momentum = momentum.double()
            generator = seeded_generator("stable-directions", name, step)
            left, values, right = top_singular(momentum, min(self.k, *momentum.shape), generator)
            prefix = f"stable/{name}/"
            metrics[prefix + "p"] = projection_energy(momentum, left, right)
            metrics[prefix + "sv1"] = values[0].item()
            if name in self.subspaces:
                old_left, old_right = (t.double() for t in self.subspaces[name])
                cos_u = principal_cosines(old_left, left.to(old_left))
                cos_v = principal_cosines(old_right, right.to(old_right))
                metrics[prefix + "p_prev"] = projection_energy(momentum, old_left, old_right)
                metrics[prefix + "cos_u_mean"] = cos_u.mean().item()
                metrics[prefix + "cos_u_min"] = cos_u.min().item()
                metrics[prefix + "cos_v_mean"] = cos_v.mean().item()
                metrics[prefix + "cos_v_min"] = cos_v.min().item()
            self.subspaces[name] = (left.to(weight.device, torch.float32), right.to(weight.device, torch.float32))
        return metrics

    def after_step(self, step: int) -> dict[str, float]:
        """Measure when `step` (optimizer steps completed) is a multiple of `every`; `{}` otherwise."""
        return self.measure(step) if step % self.every == 0 else {}


def summarize_directions(metrics: dict[str, float]) -> dict[str, float]:
    """The mean over modules of each stable-direction metric, named `stable/<metric>`."""
    by_metric: dict[str, list[float]] = {}
    for key, value in metrics.items():
        by_metric.setdefault(key.rpartition("/")[2], []).append(value)
    return {f"stable/{metric}": sum(values) / len(values) for metric, values in by_metric.items()}
