"""R·W0·P·x + b as one autograd operation whose forward and backward are written out, in place where they can be.

Composed of ordinary differentiable ops, a POET linear keeps weight-sized rotated copies (weight-centric) or rotated
activations (input-centric) alive until the backward, and its backward makes several more: it holds more memory
than the dense layer it replaces. `rotated_linear` instead saves x and the (parameter) tensors it was given, and,
only with `store`, the rotated tensors and the rotation blocks. Its backward rebuilds what was not stored and goes
back through each rotation in place (`BlockRotation.backward_`), so that at its peak it holds two weight-sized
temporaries (R·W0 and the gradient of R·W0·P) where a dense linear holds its weight's gradient beside the weight and
AdamW's two moments.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from .blocks import BlockLayout, BlockRotation, packed_gradient, rotation_pair

Linear = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Step:
    """One rotation applied in place: `rotation` (or its transpose) on the vectors along `dim` of a 2-D tensor,
    about `center` where it is given (R on the outputs of a biased layer)."""

    rotation: BlockRotation
    dim: int
    transpose: bool = False
    center: Optional[torch.Tensor] = None


def run_steps(
    steps: Sequence[Step], tensor: torch.Tensor, dtype: torch.dtype, keep_inputs: bool, in_place: bool = False
):
    """`tensor` in `dtype` after the steps in order, and, with `keep_inputs`, each step's input.

    The result is a new tensor (`tensor` itself if there are no steps and its dtype is right) unless `in_place`,
    which rotates `tensor` itself (already in `dtype`)."""
    if not steps:
        return tensor.to(dtype), []
    result = tensor if in_place else tensor.to(dtype, copy=True)
    inputs = []
    for step in steps:
        if keep_inputs:
            inputs.append(tensor if not (inputs or in_place) else result.clone())
        step.rotation.rotate_(result, step.dim, step.transpose, step.center)
    return result, inputs


def step_inputs(steps: Sequence[Step], tensor: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The input of each step of `run_steps(steps, tensor, dtype, …)`, without running the last (the first is
    `tensor`)."""
    if len(steps) < 2:
        return [tensor] * len(steps)
    result, inputs = run_steps(steps[:-1], tensor, dtype, keep_inputs=True)
    return inputs + [result]


def steps_backward(steps: Sequence[Step], inputs: list[torch.Tensor], grad: torch.Tensor, input_needs_grad: bool):
    """Gradients of each step's blocks, last step first, for `run_steps`; `grad` (which is overwritten) becomes
    the gradient of the first input where it is needed. The inputs are dropped as they are used."""
    block_grads = [None] * len(steps)
    for index in reversed(range(len(steps))):
        step, values = steps[index], inputs.pop()
        through = index > 0 or input_needs_grad
        block_grads[index] = step.rotation.backward_(grad, values, step.dim, step.transpose, step.center, through)
    return block_grads, grad


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

    def rotations_from_blocks(self, blocks: Sequence[torch.Tensor]) -> list[tuple[BlockRotation, BlockRotation]]:
        """(R, P) of each adapter from their blocks, given one tensor per group of blocks: R₁'s, P₁'s, R₂'s, …"""
        groups = iter(blocks)
        return [
            tuple(BlockRotation(layout, perm, [next(groups) for _ in layout.groups]) for layout, perm in zip(*sides))
            for sides in zip(self.layouts, self.perms)
        ]

    def steps(self, rotations, bias: Optional[torch.Tensor]) -> tuple[list[Step], list[Step], list[Step]]:
        """The rotations on the input (P₂ first), on the weight (R₁·W0·P₁ first) and on the matmul's output."""
        on_input = [] if self.right_on_weight else [Step(right, 1) for _, right in reversed(rotations)]
        on_weight = []
        for left, right in rotations:
            on_weight += [Step(left, 0)] if self.left_on_weight else []
            # row i of W·P is Pᵀ applied to row i of W
            on_weight += [Step(right, 1, transpose=True)] if self.right_on_weight else []
        on_output = [] if self.left_on_weight else [Step(left, 1, center=bias) for left, _ in rotations]
        return on_input, on_weight, on_output


def _autocast_state(device_type: str) -> tuple[str, bool, Optional[torch.dtype]]:
    if not torch.amp.is_autocast_available(device_type):
        return device_type, False, None
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(state: tuple[str, bool, Optional[torch.dtype]]):
    device_type, enabled, dtype = state
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


def _rebuilt_operand(steps: Sequence[Step], tensor: torch.Tensor, dtype: torch.dtype, needed: bool):
    """The rotated operand (None unless `needed`) and each step's input, for a backward that rebuilds them: the
    last step runs only if its result is `needed`."""
    if needed:
        return run_steps(steps, tensor, dtype, keep_inputs=True)
    return None, step_inputs(steps, tensor, dtype)


class _RotatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: RotatedLinearPlan, store: bool, x, weight, bias, *packed):
        # Detached, so that module hooks inside `plan.linear` (FlopCounterMode's, for one) see plain tensors.
        x, weight, bias = (None if t is None else t.detach() for t in (x, weight, bias))
        rotations = plan.rotations(packed)
        on_input, on_weight, on_output = plan.steps(rotations, bias)
        rotated_x, input_inputs = run_steps(on_input, _rows(x), plan.compute_dtype, keep_inputs=store)
        rotated_weight, weight_inputs = run_steps(on_weight, weight, plan.compute_dtype, keep_inputs=store)
        matmul = plan.linear(rotated_x, rotated_weight, bias)
        ctx.plan, ctx.x_shape, ctx.autocast = plan, x.shape, _autocast_state(x.device.type)
        stored = []
        if store:
            output, output_inputs = run_steps(on_output, matmul, matmul.dtype, keep_inputs=True)
            blocks = [group for pair in rotations for rotation in pair for group in rotation.blocks]
            stored = [*blocks, rotated_x, rotated_weight, *input_inputs, *weight_inputs, *output_inputs]
        else:
            output, _ = run_steps(on_output, matmul, matmul.dtype, keep_inputs=False, in_place=True)
        ctx.counts = (len(blocks), len(input_inputs), len(weight_inputs)) if store else None
        ctx.save_for_backward(x, weight, bias, *packed, *stored)
        return output.view(*x.shape[:-1], output.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        plan = ctx.plan
        x, weight, bias, *saved = ctx.saved_tensors
        packed, saved = saved[: len(ctx.needs_input_grad) - 5], saved[len(ctx.needs_input_grad) - 5 :]
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[2:5]
        stored = ctx.counts is not None
        if stored:  # the blocks, the rotated operands and each rotation's input, as the forward kept them
            num_blocks, num_input, num_weight = ctx.counts
            rotations = plan.rotations_from_blocks(saved[:num_blocks])
            rotated_x, rotated_weight, *inputs = saved[num_blocks:]
            input_inputs, weight_inputs = inputs[:num_input], inputs[num_input : num_input + num_weight]
            output_inputs = inputs[num_input + num_weight :]
        else:  # rebuilt outside autograd
            rotations = plan.rotations(packed)
        with torch.no_grad(), _autocast(ctx.autocast):
            on_input, on_weight, on_output = plan.steps(rotations, bias)
            if not stored:
                # The rotated input feeds the weight's gradient, the rotated weight the input's, and both the
                # matmul's output where R acts on it: a first weight-centric layer needs only R·W0, not R·W0·P.
                needs_rotated_x = needs_weight or bool(on_weight) or bool(on_output)
                needs_rotated_weight = needs_x or bool(on_input) or bool(on_output)
                rotated_x, input_inputs = _rebuilt_operand(on_input, _rows(x), plan.compute_dtype, needs_rotated_x)
                rotated_weight, weight_inputs = _rebuilt_operand(
                    on_weight, weight, plan.compute_dtype, needs_rotated_weight
                )
                if on_output:
                    matmul = plan.linear(rotated_x, rotated_weight, bias)
                    output_inputs = step_inputs(on_output, matmul, matmul.dtype)
                else:
                    output_inputs = []
            del saved
            grad = _rows(grad_output)
            # R acts about the bias (R·(z − b) + b with z = x·Wᵀ + b), so the bias's gradient is the output's.
            grad_bias = grad.sum(0).to(bias.dtype) if needs_bias else None
            output_grads, grad = steps_backward(on_output, output_inputs, grad.clone() if on_output else grad, True)
            # The matmul's backward by hand: x·Wᵀ + b gives dx = dz·W, dW = dzᵀ·x.
            grad_x = grad @ rotated_weight if (needs_x or on_input) else None
            del rotated_weight
            grad_weight = grad.t() @ rotated_x if (needs_weight or on_weight) else None
            del rotated_x
            del grad
            weight_grads, grad_weight = steps_backward(on_weight, weight_inputs, grad_weight, needs_weight)
            input_grads, grad_x = steps_backward(on_input, input_inputs, grad_x, needs_x)
        grads_of = {}
        for steps, grads in ((on_input, input_grads), (on_weight, weight_grads), (on_output, output_grads)):
            grads_of.update({id(step.rotation): step_grads for step, step_grads in zip(steps, grads)})
        # R₁, P₁, R₂, P₂, … as `packed`. Without `store` the blocks and the weight-sized temporaries are let go
        # before Cayley–Neumann's backward, which `packed_gradient` runs a few blocks at a time; with `store`, ctx
        # holds what the forward saved until the backward returns.
        side_grads = [grads_of[id(rotation)] for pair in rotations for rotation in pair]
        del rotations, on_input, on_weight, on_output, grads_of, input_grads, weight_grads, output_grads
        layouts = [(layout, terms) for pair, terms in zip(plan.layouts, plan.neumann_terms) for layout in pair]
        grad_packed = []
        for (layout, terms), q, need in zip(layouts, packed, ctx.needs_input_grad[5:]):
            block_grads = side_grads.pop(0)
            grad_packed.append(packed_gradient(layout, q, block_grads, terms) if need else None)
            del block_grads
        grad_x = grad_x.view(ctx.x_shape).to(x.dtype) if needs_x else None
        grad_weight = grad_weight.to(weight.dtype) if needs_weight else None
        return None, None, grad_x, grad_weight, grad_bias, *grad_packed


def rotated_linear(
    plan: RotatedLinearPlan,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    packed: Sequence[torch.Tensor],
    store: bool = False,
) -> torch.Tensor:
    """R·W0·P·x + b as planned; autograd saves only x and the given tensors, and with `store` the rotated tensors
    and the rotation blocks too (a faster backward for weight- or activation-sized tensors held until it runs)."""
    return _RotatedLinear.apply(plan, store, x, weight, bias, *packed)
