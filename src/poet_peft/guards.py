"""Guards on what poet-peft writes and loads: no NaN or inf weights, no permutation that is not one."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def raise_if_nonfinite(named_tensors: Iterable[tuple[str, torch.Tensor]], action: str) -> None:
    """Raise FloatingPointError naming the first floating tensor that holds NaN or inf, before `action` happens."""
    for name, tensor in named_tensors:
        if tensor is None or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise FloatingPointError(
                f"Refusing {action}: {name} holds {int((~finite).sum())} NaN or inf value(s) of {tensor.numel()}, "
                "so nothing was written. Training diverged (lower the learning rate or max_grad_norm and resume "
                "from an earlier checkpoint), or a 16-bit weight overflowed (keep it in float32)."
            )


def raise_unless_permutation(perm: torch.Tensor, size: int, where: str) -> None:
    """Raise ValueError unless perm is a permutation of 0..size-1 (what a tampered or damaged file may not hold)."""
    if perm.dim() != 1 or perm.numel() != size:
        raise ValueError(f"{where} must be a permutation of {size} indices, but it has shape {tuple(perm.shape)}.")
    if perm.dtype != torch.long or not torch.equal(perm.sort().values, torch.arange(size, device=perm.device)):
        raise ValueError(
            f"{where} is not a permutation of 0..{size - 1} (repeated, missing or out-of-range indices, or a "
            f"{perm.dtype} tensor): the file is damaged or was altered. Save the adapter again from the run."
        )


def raise_if_tied(model: torch.nn.Module, name: str, weight: torch.Tensor, method: str) -> None:
    """Raise ValueError if `weight` (the parameter `name`) is tied to another of the model's parameters."""
    tied = [
        other for other, param in model.named_parameters(remove_duplicate=False) if param is weight and other != name
    ]
    if tied:
        raise ValueError(
            f"{method} cannot rewrite {name}: it is tied to {', '.join(tied)} (e.g. tie_word_embeddings), so changing "
            "it would change those too. Leave it out of the targets, or untie it first (set "
            "config.tie_word_embeddings=False and give it its own copy of the weight)."
        )
