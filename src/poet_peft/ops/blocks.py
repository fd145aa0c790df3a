"""Permuted block-diagonal rotations (POET's stochastic primitives), applied to activations or weights.

A side of a weight (its rows or its columns) of dimension d is rotated by Πᵀ·diag(B₁, …, B_k, I)·Π: Π permutes
the d coordinates, the blocks B_i rotate consecutive runs of the permuted coordinates, and whatever the blocks
do not cover stays put. `BlockLayout` says how the blocks are sized; `BlockRotation` holds one such matrix.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import kernels
from .orthogonal import nearest_orthogonal, packed_size, rotation_from_skew, skew_from_packed


def _full_precision(tensor: torch.Tensor):
    # Rotations stay in their own dtype (float32 or finer) even inside a bf16/fp16 autocast region.
    if not torch.amp.is_autocast_available(tensor.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=tensor.device.type, enabled=False)


@dataclass(frozen=True)
class BlockLayout:
    """The block sizes of one side: `groups` of (count, size) blocks laid over a prefix of the permuted dimension."""

    dim: int
    groups: tuple[tuple[int, int], ...]

    @property
    def covered(self) -> int:
        """How many of the permuted coordinates the blocks rotate; the rest are left as they are."""
        return sum(count * size for count, size in self.groups)

    @property
    def sizes(self) -> list[int]:
        """The block size of each group."""
        return [size for _, size in self.groups]

    @property
    def rotated_squares(self) -> int:
        """Σ b² over the blocks: the multiply-adds of rotating one vector of this side."""
        return sum(count * size * size for count, size in self.groups)

    @property
    def num_parameters(self) -> int:
        """Trainable parameters: b(b−1)/2 per block."""
        return sum(count * packed_size(size) for count, size in self.groups)


def block_stochastic_layout(dim: int, block: int) -> BlockLayout:
    """POET-BS: ⌊dim/b⌋ blocks of b, plus one block of the remainder, so that every coordinate is rotated.

    A remainder of 1 joins the last block (size b+1), since a 1×1 rotation is the identity.
    """
    count, remainder = divmod(dim, block)
    if remainder == 0:
        groups = ((count, block),)
    elif remainder == 1:
        groups = ((count - 1, block), (1, block + 1)) if count > 1 else ((1, block + 1),)
    else:
        groups = ((count, block), (1, remainder))
    return BlockLayout(dim, tuple(g for g in groups if g[0] > 0))


def _gradients_through(left_on_weight: bool, right_on_weight: bool, input_needs_grad: bool) -> tuple[bool, bool]:
    """Whether a training backward passes a gradient through R and through P, beyond their blocks' own gradients.

    On the weight R acts first, on the frozen W0, so nothing needs a gradient through it; P then acts on R·W0,
    which does when R sits on the weight too. On the activations R's input comes from the matmul and always
    needs one, and P's input is the layer's input.
    """
    through_right = left_on_weight if right_on_weight else input_needs_grad
    return not left_on_weight, through_right


def rotation_flops(
    left: BlockLayout,
    right: BlockLayout,
    tokens: int,
    left_on_weight: bool,
    right_on_weight: bool,
    training: bool,
    input_needs_grad: bool,
    recompute: bool = False,
) -> int:
    """Flops of one R·W0·P·x call on `tokens` vectors, matmul included: the forward, and the backward if training.

    R (layout `left`, on the outputs) and P (`right`, on the inputs) each rotate the weight or the activations.
    Rotating one vector costs 2·Σb² flops: a side on the weight rotates the weight's other dimension's worth of
    vectors, a side on the activations rotates `tokens` of them. W0 is frozen. With `recompute` (the backward of
    `recomputing_rotated_linear`) both rotations run again, and the matmul too where R acts on the outputs. The
    Cayley–Neumann blocks cost the same on every path and are left out.
    """
    matmul = 2 * tokens * left.dim * right.dim
    left_rotation = 2 * left.rotated_squares * (right.dim if left_on_weight else tokens)
    right_rotation = 2 * right.rotated_squares * (left.dim if right_on_weight else tokens)
    flops = matmul + left_rotation + right_rotation
    if not training:
        return flops
    # The matmul's weight gradient if a side sits on the weight; its input gradient if P's gradient needs it (P on
    # the activations) or the input wants one.
    flops += matmul * (int(left_on_weight or right_on_weight) + int(not right_on_weight or input_needs_grad))
    # Each rotation: its blocks' gradient, plus the gradient through it where one is needed.
    through_left, through_right = _gradients_through(left_on_weight, right_on_weight, input_needs_grad)
    flops += left_rotation * (1 + through_left) + right_rotation * (1 + through_right)
    if recompute:
        flops += left_rotation + right_rotation + matmul * (not left_on_weight)
    return flops


# On a CPU, moving one fp32 element through a permutation (the gather, and the copies einsum makes around its
# bmm) costs about as long as 512 flops of a large matmul: bench_layer.py on this repository's 2-core machine
# (d=2048, 8192 tokens, b=256) spends 1302 ms on an input-centric step whose matmuls take 686 ms, rotations
# ~290 ms and 117 M elements moved the rest (2.8 ns each, at 200 GFLOP/s). `forward_path="auto"` weighs the
# permutations' data movement with it on the torch path (the CUDA kernels fuse their gathers).
PERMUTED_ELEMENT_FLOPS = 512


def permuted_elements(
    left: BlockLayout,
    right: BlockLayout,
    tokens: int,
    left_on_weight: bool,
    right_on_weight: bool,
    training: bool,
    input_needs_grad: bool,
    recompute: bool = False,
) -> int:
    """Elements the permutations move in one call: each side is gathered into block order and back, and in a
    training backward its gradient once more, twice where a gradient passes through the rotation, and the forward's
    two passes again with `recompute`. A side on the weight moves the weight's m·n elements per pass, a side on the
    activations tokens·dim."""
    through = _gradients_through(left_on_weight, right_on_weight, input_needs_grad)
    passes_again = 2 * (training and recompute)
    return sum(
        (2 + passes_again + training * (1 + passes_through))
        * (left.dim * right.dim if on_weight else tokens * layout.dim)
        for layout, on_weight, passes_through in zip((left, right), (left_on_weight, right_on_weight), through)
    )


def placement_cost(
    left: BlockLayout,
    right: BlockLayout,
    tokens: int,
    sides: tuple[bool, bool],
    training: bool,
    input_needs_grad: bool,
    recompute: bool = False,
) -> int:
    """What forward_path="auto" minimises for R, P on (weight?, weight?) = `sides`: flops plus data movement."""
    flops = rotation_flops(left, right, tokens, *sides, training, input_needs_grad, recompute)
    moved = permuted_elements(left, right, tokens, *sides, training, input_needs_grad, recompute)
    return flops + PERMUTED_ELEMENT_FLOPS * moved


def fully_stochastic_size(dim: int, fraction: float) -> int:
    """POET-FS block size ⌈fraction·dim⌉ (rounding guards against 0.1·30 = 3.0000000000000004)."""
    return math.ceil(round(fraction * dim, 9))


def fully_stochastic_layout(dim: int, fraction: float) -> BlockLayout:
    """POET-FS: a single ⌈fraction·dim⌉ block over a random subset of the coordinates."""
    return BlockLayout(dim, ((1, fully_stochastic_size(dim, fraction)),))


class _Permutation(torch.autograd.Function):
    """x.index_select(dim, perm) for a permutation, whose backward gathers with the inverse instead of scattering."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.dim = dim
        ctx.save_for_backward(inverse)
        return x.index_select(dim, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(ctx.dim, inverse), None, None, None


def permute(x: torch.Tensor, dim: int, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x with its entries along `dim` reordered by `perm` (`inverse` must undo it); differentiable, gathers only."""
    return _Permutation.apply(x, dim, perm, inverse)


class BlockRotation:
    """The matrix Πᵀ·diag(B₁, …, B_k, I)·Π for one side of a weight, where Π is given by `perm`."""

    def __init__(self, layout: BlockLayout, perm: torch.Tensor, blocks: list[torch.Tensor]):
        self.layout = layout
        self.perm = perm
        self.blocks = blocks

    @functools.cached_property
    def inverse_perm(self) -> torch.Tensor:
        """The permutation that undoes `perm`."""
        return torch.argsort(self.perm)

    @classmethod
    def from_packed(
        cls,
        layout: BlockLayout,
        perm: torch.Tensor,
        packed: torch.Tensor,
        neumann_terms: int | None,
        dtype: torch.dtype | None = None,
    ) -> BlockRotation:
        """Rotation blocks from the flat vector of packed skew parameters, in `dtype` (default float32 or finer)."""
        dtype = dtype or torch.promote_types(packed.dtype, torch.float32)
        on_kernels = (
            neumann_terms is not None
            and dtype in (torch.float32, torch.float64)
            and kernels.use_kernels(packed, layout.sizes)
        )
        blocks, start = [], 0
        with _full_precision(packed):
            for count, size in layout.groups:
                stop = start + count * packed_size(size)
                group = packed[start:stop].to(dtype).view(count, packed_size(size))
                if on_kernels:
                    blocks.append(kernels.cayley_neumann(group, size, neumann_terms))
                else:
                    blocks.append(rotation_from_skew(skew_from_packed(group, size), neumann_terms))
                start = stop
        return cls(layout, perm, blocks)

    def apply(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Multiply every vector along the last dimension of x by this matrix (or its transpose), in x's dtype."""
        return self._apply(x, self.blocks, transpose, keep_uncovered=True)

    def apply_minus_identity(self, x: torch.Tensor) -> torch.Tensor:
        """(M − I)·v for every vector v along the last dimension of x, in x's dtype: exactly 0 for identity blocks."""
        eye = [torch.eye(b.shape[-1], dtype=b.dtype, device=b.device) for b in self.blocks]
        return self._apply(x, [b - i for b, i in zip(self.blocks, eye)], transpose=False, keep_uncovered=False)

    def _apply(
        self, x: torch.Tensor, blocks: list[torch.Tensor], transpose: bool, keep_uncovered: bool
    ) -> torch.Tensor:
        if blocks[0].dtype == kernels.accumulator_dtype(x.dtype) and kernels.use_kernels(x, self.layout.sizes):
            rows = x.reshape(-1, x.shape[-1])  # a 2-D x (a transposed weight) goes as it is, strides and all
            return kernels.block_rotate(rows, self.perm, blocks, transpose, keep_uncovered).view(x.shape)
        permuted = permute(x.to(blocks[0].dtype), -1, self.perm, self.inverse_perm)
        pieces, start = [], 0
        equation = "...kj,kji->...ki" if transpose else "...kj,kij->...ki"
        with _full_precision(x):
            for group_blocks, (count, size) in zip(blocks, self.layout.groups):
                segment = permuted[..., start : start + count * size].unflatten(-1, (count, size))
                pieces.append(torch.einsum(equation, segment, group_blocks).flatten(-2))
                start += count * size
        if start < self.layout.dim:
            uncovered = permuted[..., start:]
            pieces.append(uncovered if keep_uncovered else torch.zeros_like(uncovered))
        rotated = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return permute(rotated, -1, self.inverse_perm, self.perm).to(x.dtype)

    def rotate_columns(self, matrix: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """This matrix (or its transpose) times a 2-D `matrix` of shape (dim, k), in `matrix`'s dtype."""
        blocks = self.blocks
        if blocks[0].dtype == kernels.accumulator_dtype(matrix.dtype) and kernels.use_kernels(
            matrix, self.layout.sizes
        ):
            return self.apply(matrix.transpose(0, 1), transpose).transpose(0, 1)
        # Whole rows are gathered and rotated block by block by bmm on contiguous memory: on a CPU, gathering the
        # columns of a transposed weight (what `apply` would do) costs as much as the rotation itself.
        rows = permute(matrix.to(blocks[0].dtype), 0, self.perm, self.inverse_perm)
        pieces, start = [], 0
        with _full_precision(matrix):
            for group_blocks, (count, size) in zip(blocks, self.layout.groups):
                stop = start + count * size
                group_blocks = group_blocks.transpose(-1, -2) if transpose else group_blocks
                pieces.append(torch.bmm(group_blocks, rows[start:stop].view(count, size, -1)).flatten(0, 1))
                start = stop
        if start < self.layout.dim:  # rows no block rotates
            pieces.append(rows[start:])
        rotated = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return permute(rotated, 0, self.inverse_perm, self.perm).to(matrix.dtype)

    def inverse(self) -> BlockRotation:
        """The exact inverse (blocks inverted in float64), for when the blocks are only nearly orthogonal."""
        blocks = [torch.linalg.inv(b.double()).to(b.dtype) for b in self.blocks]
        return BlockRotation(self.layout, self.perm, blocks)

    def orthogonalized(self) -> BlockRotation:
        """The same rotation with every block replaced by its closest orthogonal matrix."""
        return BlockRotation(self.layout, self.perm, [nearest_orthogonal(b) for b in self.blocks])


def rotation_pair(
    layouts: tuple[BlockLayout, BlockLayout],
    perms: tuple[torch.Tensor, torch.Tensor],
    packed: tuple[torch.Tensor, torch.Tensor],
    neumann_terms: int | None,
    dtype: torch.dtype | None = None,
) -> tuple[BlockRotation, BlockRotation]:
    """(R, P) of one POET adapter from the layouts, permutations and packed skew parameters of its two sides."""
    left, right = (
        BlockRotation.from_packed(layout, perm, q, neumann_terms, dtype)
        for layout, perm, q in zip(layouts, perms, packed)
    )
    return left, right


def rotate_weight(
    weight: torch.Tensor, left: Optional[BlockRotation] = None, right: Optional[BlockRotation] = None
) -> torch.Tensor:
    """L·W·M for a weight W of shape (out, in), L acting on its columns and M on its rows; None means identity.

    L is applied first, gathering and rotating whole rows of W (`rotate_columns`); M then rotates the entries within
    each row (`apply`). Neither gathers a strided column, and the result is contiguous.
    """
    if left is not None:
        weight = left.rotate_columns(weight)
    if right is not None:  # row i of W·M is Mᵀ applied to row i of W
        weight = right.apply(weight, transpose=True)
    return weight
