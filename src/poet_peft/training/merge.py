"""Merge-then-reinitialize: fold the learned rotations into W0, restart Q at zero, and forget Q's optimizer state."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn

from ..tuners.poet.model import poet_layers, poet_parameters


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Forget the optimizer state (moments and step) of `params`; the next step re-initialises it as for a new one.

    Works for every torch.optim optimizer, which all create per-parameter state lazily, and for wrappers such as
    Accelerate's AcceleratedOptimizer, whose `state` is the wrapped optimizer's.
    """
    state = optimizer.state
    for param in params:
        state.pop(param, None)


@torch.no_grad()
def merge_and_reinit(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """POET's merge: W0 ← R·W0·P in every POET layer, Q ← 0, new permutations, Q's optimizer state reset.

    Every draw comes from a generator seeded by (seed, layer name, adapter, side, merge count), so all ranks of a
    distributed run merge identically without communicating. Returns the number of layers merged: none while
    the adapters are disabled (`with model.disable_adapter():`), since the forward pass then ignores them.
    """
    params = poet_parameters(model)
    layers = list(poet_layers(model))
    if any(layer.disable_adapters for layer in layers):
        warnings.warn("merge_and_reinit skipped: the POET adapters are disabled.", stacklevel=2)
        return 0
    for layer in layers:  # all checked before any is merged, so a refused merge leaves every W0 as it was
        layer.raise_unless_mergeable()
    for layer in layers:
        layer.merge_and_reinit()
    if optimizer is not None:
        reset_optimizer_state(optimizer, params)
    return len(layers)


def configured_merge_every(model: nn.Module) -> Optional[int]:
    """The `merge_every` of the model's active POET adapters (None if it has none or they never merge)."""
    values = {
        layer.poet_config[name].merge_every
        for layer in poet_layers(model)
        for name in layer.active_adapters
        if name in layer.poet_config
    }
    if len(values) > 1:
        raise ValueError(f"The active POET adapters disagree on merge_every ({sorted(values, key=str)}); pass one.")
    return values.pop() if values else None


class MergeSchedule:
    """When to merge-then-reinitialize, and the post-merge gradient-clip ramp, for hand-written training loops.

    Call `clip_norm(max_norm, step)` before clipping and `after_step(step)` after each optimizer step, where
    `step` counts the optimizer steps completed so far. Being a function of `step` alone, it resumes exactly.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        merge_every: Optional[int] = None,
        clip_ramp_steps: int = 10,
        clip_ramp_start: float = 0.1,
        clip_ramp_until: Optional[int] = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.merge_every = merge_every if merge_every is not None else configured_merge_every(model)
        if self.merge_every is not None and self.merge_every < 1:
            raise ValueError(f"merge_every={self.merge_every} is invalid: use an integer ≥ 1, or None to never merge.")
        if clip_ramp_steps < 0 or not 0 < clip_ramp_start <= 1:
            raise ValueError(
                f"clip_ramp_steps={clip_ramp_steps}, clip_ramp_start={clip_ramp_start} are invalid: "
                "use clip_ramp_steps ≥ 0 (0 disables the ramp) and clip_ramp_start in (0, 1]."
            )
        if clip_ramp_until is not None and clip_ramp_until < 0:
            raise ValueError(f"clip_ramp_until={clip_ramp_until} is invalid: use a step count ≥ 0, or None.")
        self.clip_ramp_steps = clip_ramp_steps
        self.clip_ramp_start = clip_ramp_start
        self.clip_ramp_until = clip_ramp_until

    def is_merge_step(self, step: int) -> bool:
        """Whether a merge follows optimizer step number `step` (1-based)."""
        return self.merge_every is not None and step > 0 and step % self.merge_every == 0

    def after_step(self, step: int) -> bool:
        """Merge-then-reinitialize if `step` completed optimizer steps call for it; says whether it merged."""
        if not self.is_merge_step(step):
            return False
        merge_and_reinit(self.model, self.optimizer)
        return True

    def clip_norm(self, max_norm: float, step: int) -> float:
        """The gradient-clip norm for the next optimizer step: max_norm, or less in the first steps after a merge.

        Right after a merge the clip starts at clip_ramp_start·max_norm and rises linearly back to max_norm over
        clip_ramp_steps steps, as in the official POET code (0.1 and 10 there). With clip_ramp_until set, only
        while step ≤ clip_ramp_until (the official code's gd_warmup_steps, 2000); after every merge otherwise.
        """
        if self.merge_every is None or step < self.merge_every:
            return max_norm
        if self.clip_ramp_until is not None and step > self.clip_ramp_until:
            return max_norm
        since_merge = step % self.merge_every
        if since_merge >= self.clip_ramp_steps:
            return max_norm
        return max_norm * (self.clip_ramp_start + (1 - self.clip_ramp_start) * since_merge / self.clip_ramp_steps)
