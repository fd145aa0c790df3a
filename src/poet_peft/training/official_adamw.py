"""The AdamW of the official POET code (`POETAdamW` in Sphere-AI-Lab/poet), for `run_clm.py --recipe official`.

It differs from `torch.optim.AdamW` in two places: eps is added to √v before the bias correction (the update is
lr·m̂/(√v̂ + eps/√(1−β₂ᵗ)), so the first steps after a reset are smaller where v is tiny), and the decoupled weight
decay is applied after the update instead of before it. Its lr scale for POET's parameters (`poet_scale`) is a
plain factor on their lr, so the recipe folds it into that group's lr instead.
"""

from __future__ import annotations

import math

import torch


class OfficialAdamW(torch.optim.Optimizer):
    """AdamW with the official POET code's eps placement and weight-decay order (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(
                f"OfficialAdamW(lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}) is invalid: use "
                "lr, eps and weight_decay ≥ 0 and betas in [0, 1)."
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("OfficialAdamW does not take sparse gradients: use torch.optim.SparseAdam.")
                state = self.state[param]
                if not state:  # new, or reset at a merge (reset_optimizer_state): moments and step start over
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(param.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denominator = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                param.addcdiv_(exp_avg, denominator, value=-step_size)
                if group["weight_decay"] > 0:
                    param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        return loss
