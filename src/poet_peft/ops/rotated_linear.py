"""R·W0·P·x + b as one autograd operation that saves what a dense linear saves (its input) and recomputes the rest.

A POET linear composed of ordinary differentiable ops keeps weight-sized rotated copies (weight-centric) or rotated
activations (input-centric) alive until the backward, so it holds more memory than the dense layer it replaces.
`recomputing_rotated_linear` saves only x and the (parameter) tensors it was given; its backward rebuilds the
rotation blocks from the packed skew parameters, the rotated input and weight, and, where R acts on the outputs, the
matmul's output, then differentiates through them. The matmul's own backward is written out, so the main matmul is
not run again unless R sits on the outputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from .blocks import BlockLayout, BlockRotation, rotate_weight, rotation_pair

Linear = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True, eq=False)
class RotatedLinearPlan:
    """Everything about one R·W0·P·x + b call except the tensors autograd tracks.

    Per adapter, in order, the layouts and permutations of R (outputs) and P (inputs) and its Neumann terms; where
    each rotation goes (`left_on_weight` for R, `right_on_weight` for P); `linear(x, weight, bias)`, the base layer's
    own x·Wᵀ + b on an (out, in) weight; and `compute_dtype`, the dtype of the matmul's operands.
    """

    layouts: tuple[tuple[BlockLayout, BlockLayout], ...]
    perms: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    neumann_terms: tuple[Optional[int], ...]
    left_on_weight: bool
    right_on_weight: bool
    linear: Linear
    compute_dtype: torch.dtype

    def rotations(self, packed: Sequence[torch.Tensor]) -> list[tuple[BlockRotation, BlockRotation]]:
        """(R, P) of each adapter from its packed skew parameters, given as R₁, P₁, R₂, P₂, …"""
        return [
            rotation_pair(layouts, perms, tuple(packed[2 * i : 2 * i + 2]), terms)
            for i, (layouts, perms, terms) in enumerate(zip(self.layouts, self.perms, self.neumann_terms))
        ]

    def rotate_input(self, x: torch.Tensor, rotations) -> torch.Tensor:
        """x·(P₁P₂)ᵀ where P acts on the activations (P₂ first), in the compute dtype."""
        if not self.right_on_weight:
            for _, right in reversed(rotations):
                x = right.apply(x)
        return x.to(self.compute_dtype)

    def rotate_weight(self, weight: torch.Tensor, rotations) -> torch.Tensor:
        """R₂R₁·W0·P₁P₂ restricted to the sides that act on the weight, in the compute dtype."""
        weight = weight.to(self.compute_dtype)
        if self.left_on_weight or self.right_on_weight:
            for left, right in rotations:
                weight = rotate_weight(
                    weight, left if self.left_on_weight else None, right if self.right_on_weight else None
                )
        return weight

    def rotate_output(self, result: torch.Tensor, bias: Optional[torch.Tensor], rotations) -> torch.Tensor:
        """R applied to the matmul's output z + b where R acts on the activations: R·z + b."""
        if not self.left_on_weight:
            for left, _ in rotations:
                # R·(u − b) + b written as u + (R − I)·(u − b): exact when R = I, so fresh adapters change nothing.
                result = left.apply(result) if bias is None else result + left.apply_minus_identity(result - bias)
        return result

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], packed) -> torch.Tensor:
        """The whole call composed of differentiable ops (autograd keeps every intermediate it needs)."""
        rotations = self.rotations(packed)
        rotated_x, rotated_weight = self.rotate_input(x, rotations), self.rotate_weight(weight, rotations)
        return self.rotate_output(self.linear(rotated_x, rotated_weight, bias), bias, rotations)


def _autocast_state(device_type: str) -> tuple[str, bool, Optional[torch.dtype]]:
    if not torch.amp.is_autocast_available(device_type):
        return device_type, False, None
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(state: tuple[str, bool, Optional[torch.dtype]]):
    device_type, enabled, dtype = state
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)


def _leaf(tensor: Optional[torch.Tensor], needs_grad: bool) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach().requires_grad_(needs_grad)


def _grad(leaf: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if leaf is None else leaf.grad


def _detached(rotation: BlockRotation) -> BlockRotation:
    # The same rotation on detached copies of its blocks: each stage of the backward then ends at these leaves.
    return BlockRotation(
        rotation.layout, rotation.perm, [_leaf(block, block.requires_grad) for block in rotation.blocks]
    )


def _backward_into_leaves(outputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    pairs = [(out, grad.to(out.dtype)) for out, grad in zip(outputs, grads) if out.requires_grad]
    if pairs:
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])


class _RecomputingRotatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: RotatedLinearPlan, x, weight, bias, *packed):
        ctx.plan = plan
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, weight, bias, *packed)
        return plan.forward(x, weight, bias, packed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        plan = ctx.plan
        x, weight, bias, *packed = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.enable_grad(), _autocast(ctx.autocast):
            # The rotation blocks are rebuilt once and detached, so that the three stages below each free their
            # graph as they go; their gradients are sent back through Cayley–Neumann at the end.
            packed = [_leaf(q, need) for q, need in zip(packed, needs[4:])]
            built = plan.rotations(packed)
            blocks = [block for pair in built for rotation in pair for block in rotation.blocks]
            rotations = [tuple(_detached(rotation) for rotation in pair) for pair in built]
            block_leaves = [block for pair in rotations for rotation in pair for block in rotation.blocks]
            x, weight, bias = _leaf(x, needs[1]), _leaf(weight, needs[2]), _leaf(bias, needs[3])
            rotated_x, rotated_weight = plan.rotate_input(x, rotations), plan.rotate_weight(weight, rotations)
            grad_matmul = grad_output
            if not plan.left_on_weight:  # R acts on the matmul's output: recompute it, then go back through R
                with torch.no_grad():
                    matmul = plan.linear(rotated_x, rotated_weight, bias).requires_grad_()
                output = plan.rotate_output(matmul, bias, rotations)
                _backward_into_leaves([output], [grad_output])
                grad_matmul = matmul.grad
            # The matmul's backward by hand: x·Wᵀ + b gives dx = dz·W, dW = dzᵀ·x, db = Σ dz.
            grad_rotated_x = grad_matmul @ rotated_weight.detach() if rotated_x.requires_grad else None
            grad_rotated_weight = None
            if rotated_weight.requires_grad:
                flat_grad, flat_x = grad_matmul.reshape(-1, grad_matmul.shape[-1]), rotated_x.detach()
                grad_rotated_weight = flat_grad.t() @ flat_x.reshape(-1, flat_x.shape[-1])
            if bias is not None and bias.requires_grad:
                matmul_bias_grad = grad_matmul.reshape(-1, grad_matmul.shape[-1]).sum(0).to(bias.dtype)
                bias.grad = matmul_bias_grad if bias.grad is None else bias.grad + matmul_bias_grad
            _backward_into_leaves([rotated_x, rotated_weight], [grad_rotated_x, grad_rotated_weight])
            block_grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in block_leaves]
            _backward_into_leaves(blocks, block_grads)
        return None, _grad(x), _grad(weight), _grad(bias), *(_grad(q) for q in packed)


def recomputing_rotated_linear(
    plan: RotatedLinearPlan,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    packed: Sequence[torch.Tensor],
) -> torch.Tensor:
    """`plan.forward(x, weight, bias, packed)` whose autograd saves only x (and the given parameters)."""
    return _RecomputingRotatedLinear.apply(plan, x, weight, bias, *packed)
