"""Optimizer parameter groups for POET training, as in the paper and the official code."""

from __future__ import annotations

from torch import nn

from ..tuners.poet.model import poet_parameters


def param_groups(model: nn.Module, lr: float, poet_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Three groups of the trainable parameters: POET's Q (poet_lr, no decay), matrices (lr, decay), the rest (lr).

    Pass the result to any torch.optim optimizer. Matrices are the ≥2-D parameters outside POET, e.g. the
    embeddings and lm_head when they train (modules_to_save); vectors are norms and biases, never decayed.
    """
    poet = [param for param in poet_parameters(model) if param.requires_grad]
    poet_ids = {id(param) for param in poet}
    others = [param for param in model.parameters() if param.requires_grad and id(param) not in poet_ids]
    groups = [
        {"params": poet, "lr": poet_lr, "weight_decay": 0.0},
        {"params": [param for param in others if param.ndim >= 2], "lr": lr, "weight_decay": weight_decay},
        {"params": [param for param in others if param.ndim < 2], "lr": lr, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
