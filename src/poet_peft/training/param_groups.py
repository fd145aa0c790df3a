"""Optimizer parameter groups for every method (plain, POET, spectral LoRA, E4), and adding groups mid-run."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..principal import principal_cores
from ..tuners.poet.model import poet_parameters
from ..tuners.spectral_lora.model import magnitude_parameters


def create_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    magnitude_lr_ratio: float = 10.0,
    poet_lr: Optional[float] = None,
    core_lr_ratio: float = 10.0,
) -> list[dict]:
    """Named optimizer groups of the trainable parameters, for any torch.optim optimizer.

    - "matrices": ≥2-D parameters not named below at lr, decayed;
    - "vectors": norms and biases at lr, never decayed;
    - "poet": POET's Q at `poet_lr` (default `lr`), no weight decay;
    - "magnitude": spectral-LoRA magnitudes at lr × magnitude_lr_ratio, no weight decay (seed 002);
    - "principal_core": E4's cores C at lr × core_lr_ratio, no weight decay.

    Groups with no parameters are left out; for a plain model only "matrices" and "vectors" remain.
    """
    trainable = [param for param in model.parameters() if param.requires_grad]
    special = {
        "poet": (poet_parameters(model), lr if poet_lr is None else poet_lr),
        "magnitude": (magnitude_parameters(model), lr * magnitude_lr_ratio),
        "principal_core": (principal_cores(model), lr * core_lr_ratio),
    }
    special_groups = [
        {
            "name": name,
            "params": [param for param in params if param.requires_grad],
            "lr": group_lr,
            "weight_decay": 0.0,
        }
        for name, (params, group_lr) in special.items()
    ]
    taken = {id(param) for group in special_groups for param in group["params"]}
    others = [param for param in trainable if id(param) not in taken]
    groups = [  # the base-lr groups first, so that group 0's lr is the base lr wherever there is one
        {"name": "matrices", "params": [p for p in others if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay},
        {"name": "vectors", "params": [p for p in others if p.ndim < 2], "lr": lr, "weight_decay": 0.0},
        *special_groups,
    ]
    return [group for group in groups if group["params"]]


def add_param_group(optimizer: torch.optim.Optimizer, group: dict, scheduler=None) -> None:
    """Add an optimizer group mid-run, taking its parameters out of their old groups (their state is kept).

    An old group left with no parameters stays, empty, so that the scheduler's per-group lists keep lining up.

    With a LambdaLR-style scheduler (transformers' get_scheduler returns one), the group joins its schedule:
    `group["lr"]` is its base lr, scaled from now on by the factor that scales the first group. Works through
    Accelerate's optimizer and scheduler wrappers.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)
    scheduler = getattr(scheduler, "scheduler", scheduler)
    # Every check before any change: a refused group leaves the optimizer and scheduler exactly as they were.
    if "params" not in group or "lr" not in group:
        raise ValueError(f"add_param_group needs a group with 'params' and 'lr'; got keys {sorted(group)}.")
    if scheduler is not None and not (hasattr(scheduler, "lr_lambdas") and hasattr(scheduler, "base_lrs")):
        raise TypeError(
            f"add_param_group cannot extend a {type(scheduler).__name__}: it extends LambdaLR-style schedulers "
            "(transformers.get_scheduler's). Pass scheduler=None and set the new group's lr yourself."
        )
    group = dict(group, params=list(group["params"]))
    if scheduler is not None:
        schedule = scheduler.lr_lambdas[0]
        group["initial_lr"] = group["lr"]
        group["lr"] = group["lr"] * schedule(scheduler.last_epoch)
    moving = {id(param) for param in group["params"]}
    for old in optimizer.param_groups:
        old["params"] = [param for param in old["params"] if id(param) not in moving]
    optimizer.add_param_group(group)
    if scheduler is not None:
        scheduler.lr_lambdas.append(schedule)
        scheduler.base_lrs.append(group["initial_lr"])
