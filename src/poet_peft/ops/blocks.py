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
from .orthogonal import (
    cayley_neumann_grad,
    nearest_orthogonal,
    packed_gradient_of_skew,
    packed_size,
    rotation_from_skew,
    skew_from_packed,
)


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


def _recomputed_sides(left_on_weight: bool, right_on_weight: bool, input_needs_grad: bool) -> tuple[bool, bool]:
    """Whether a recomputing backward runs R's and P's rotations again.

    R on the outputs is not: its backward needs only its input. P last on the weight is only for the input's
    gradient, which needs R·W0·P: its own backward needs R·W0.
    """
    return left_on_weight, not (left_on_weight and right_on_weight) or input_needs_grad


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
    `rotated_linear` without `store`) the input's and the weight's rotations run again, and the matmul where R acts
    on the outputs (R itself does not: its backward needs only its input); with both on the weight, P runs again
    only if the input wants a gradient (x's gradient needs R·W0·P, P's own needs only R·W0). The Cayley–Neumann
    blocks cost the same on every path and are left out.
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
    if recompute:  # the backward rebuilds the rotated input and weight, and the matmul where R acts on its output
        _, again_right = _recomputed_sides(left_on_weight, right_on_weight, input_needs_grad)
        flops += right_rotation * again_right + (left_rotation if left_on_weight else matmul)
    return flops


# On a CPU, moving one fp32 element through a permutation (the gather, and the copies einsum makes around its
# bmm) costs about as long as 512 flops of a large matmul: bench_layer.py on this repository's 2-core machine
# (d=2048, 8192 tokens, b=256) spends 1302 ms on an input-centric step whose matmuls take 686 ms, rotations
# ~290 ms and 117 M elements moved the rest (2.8 ns each, at 200 GFLOP/s). `forward_path="auto"` weighs the
# permutations' data movement with it on the torch path (the CUDA kernels fuse their gathers).
PERMUTED_ELEMENT_FLOPS = 512
# `BlockRotation.rotate_` works on pieces of about 1/PIECES of a tensor, which bounds its temporaries, but of at
# least MIN_PIECE_ELEMENTS (256 KiB of fp32): below that a piece's temporaries are negligible and the per-piece
# Python and dispatch overhead is not (a tiny model's layers, cut into eighths, spent more time in it than in flops).
PIECES = 8
MIN_PIECE_ELEMENTS = 1 << 16


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
    """Elements the permutations move in one call: each side is gathered into block order and back; a training
    backward gathers its gradient and its input once more, and puts the gradient back where one passes through the
    rotation; with `recompute` the forward's two passes run again for the sides `_recomputed_sides` names. A side on
    the weight moves the weight's m·n elements per pass, a side on the activations tokens·dim."""
    through = _gradients_through(left_on_weight, right_on_weight, input_needs_grad)
    rerun = _recomputed_sides(left_on_weight, right_on_weight, input_needs_grad)
    return sum(
        (2 + 2 * (training and recompute and again) + training * (2 + passes_through))
        * (left.dim * right.dim if on_weight else tokens * layout.dim)
        for layout, on_weight, passes_through, again in zip(
            (left, right), (left_on_weight, right_on_weight), through, rerun
        )
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
        blocks = [
            _blocks_from_packed(group, size, neumann_terms, dtype) for group, size in _packed_groups(layout, packed)
        ]
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
        def on_kernels() -> torch.Tensor:
            rows = x.reshape(-1, x.shape[-1])  # a 2-D x (a transposed weight) goes as it is, strides and all
            return kernels.block_rotate(rows, self.perm, blocks, transpose, keep_uncovered).view(x.shape)

        def on_torch() -> torch.Tensor:
            return self._apply_on_torch(x, blocks, transpose, keep_uncovered)

        work = f"rotate {'contiguous' if x.is_contiguous() else 'strided'} vectors"
        if blocks[0].dtype == kernels.accumulator_dtype(x.dtype) and kernels.prefer_kernels(
            x, self.layout.sizes, work, on_kernels, on_torch
        ):
            return on_kernels()
        return on_torch()

    def _apply_on_torch(
        self, x: torch.Tensor, blocks: list[torch.Tensor], transpose: bool, keep_uncovered: bool
    ) -> torch.Tensor:
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

        def on_kernels() -> torch.Tensor:
            return kernels.block_rotate(matrix.transpose(0, 1), self.perm, self.blocks, transpose, True).transpose(0, 1)

        def on_torch() -> torch.Tensor:
            return self._rotate_columns_on_torch(matrix, transpose)

        if self.blocks[0].dtype == kernels.accumulator_dtype(matrix.dtype) and kernels.prefer_kernels(
            matrix, self.layout.sizes, "rotate columns", on_kernels, on_torch
        ):
            return on_kernels()
        return on_torch()

    def _rotate_columns_on_torch(self, matrix: torch.Tensor, transpose: bool) -> torch.Tensor:
        blocks = self.blocks
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

    # -- in place, outside autograd (the hand-written backward of `rotated_linear`) ---------------------------
    def _pieces(self, vectors: int):
        """(group, first block, blocks, coordinates, vector range) pieces of at most about 1/PIECES of a tensor of
        `vectors` vectors, so that rotating in place holds only a piece's worth of temporaries."""
        budget = max(self.layout.dim * vectors // PIECES, MIN_PIECE_ELEMENTS)
        start = 0
        for group, (count, size) in enumerate(self.layout.groups):
            blocks_per_piece = max(1, min(count, budget // (size * vectors)))
            vectors_per_piece = vectors if blocks_per_piece > 1 else max(1, min(vectors, budget // size))
            for first in range(0, count, blocks_per_piece):
                blocks = min(blocks_per_piece, count - first)
                coordinates = self.perm[start + first * size : start + (first + blocks) * size]
                for begin in range(0, vectors, vectors_per_piece):
                    yield group, first, blocks, coordinates, slice(begin, min(vectors, begin + vectors_per_piece))
            start += count * size

    def _row_chunks(self, rows: int) -> list[slice]:
        """Ranges of rows of about 1/PIECES of a (rows, dim) matrix each. Rotating the coordinates of rows, whole
        rows are gathered in permuted order at once: that reads memory far better than gathering one block's
        scattered columns from every row (1.2–1.6× faster at d=1024–2048)."""
        per_chunk = max(1, max(self.layout.dim * rows // PIECES, MIN_PIECE_ELEMENTS) // self.layout.dim)
        return [slice(first, min(rows, first + per_chunk)) for first in range(0, rows, per_chunk)]

    def _rotate_piece(self, piece: torch.Tensor, blocks: torch.Tensor, dim: int, transpose: bool) -> torch.Tensor:
        # piece holds the gathered coordinates of `blocks` along `dim`: (n·b, vectors) for dim 0, (vectors, n·b) for 1
        # bmm rather than einsum: einsum turns a single vector into an elementwise product, which no flop count sees
        count, size = blocks.shape[0], blocks.shape[-1]
        blocks = blocks.transpose(-1, -2) if transpose else blocks
        if dim == 0:
            return torch.bmm(blocks, piece.view(count, size, -1)).flatten(0, 1)
        vectors = piece.unflatten(-1, (count, size)).transpose(0, 1)  # (n, vectors, b)
        return torch.bmm(vectors, blocks.transpose(-1, -2)).transpose(0, 1).flatten(1)

    def _on_kernels(self, matrix: torch.Tensor, dim: int, transpose: bool) -> bool:
        # Whether rotating `matrix` in place along `dim` (and its backward) goes to the kernels; measured, if it
        # must be, on a copy, so that the timing runs leave `matrix` as it is.
        if self.blocks[0].dtype != kernels.accumulator_dtype(matrix.dtype):
            return False
        scratch = functools.cache(matrix.clone)  # one copy, made only if timing runs
        return kernels.prefer_kernels(
            matrix,
            self.layout.sizes,
            f"rotate in place along dim {dim}",
            lambda: self._rotate_on_kernels_(scratch(), self.blocks, dim, transpose, None),
            lambda: self._rotate_on_torch_(scratch(), self.blocks, dim, transpose, None),
        )

    @torch.no_grad()
    def rotate_(
        self, matrix: torch.Tensor, dim: int, transpose: bool = False, center: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Rotate in place the vectors along `dim` of the 2-D `matrix` by this matrix (or its transpose).

        dim=1 rotates each row (as `apply`), dim=0 each column (as `rotate_columns`). With `center` (a vector along
        `dim`), v becomes center + M·(v − center), computed as v + (M − I)·(v − center) so that M = I changes
        nothing. The arithmetic is in the blocks' dtype, a piece at a time.
        """
        blocks = self.blocks
        if center is not None:
            blocks = [b - torch.eye(b.shape[-1], dtype=b.dtype, device=b.device) for b in blocks]
        if self._on_kernels(matrix, dim, transpose):
            return self._rotate_on_kernels_(matrix, blocks, dim, transpose, center)
        return self._rotate_on_torch_(matrix, blocks, dim, transpose, center)

    def _rotate_on_kernels_(
        self, matrix: torch.Tensor, blocks: list[torch.Tensor], dim: int, transpose: bool, center
    ) -> torch.Tensor:
        rows = matrix if dim == 1 else matrix.t()
        shifted = rows if center is None else rows - center
        rotated = kernels.block_rotate(shifted, self.perm, blocks, transpose, center is None)
        if center is None:
            rows.copy_(rotated)
        else:
            rows.add_(rotated)
        return matrix

    def _rotate_on_torch_(
        self, matrix: torch.Tensor, blocks: list[torch.Tensor], dim: int, transpose: bool, center
    ) -> torch.Tensor:
        with _full_precision(matrix):
            if dim == 1:
                shift = None if center is None else center[self.perm]
                ranges = self._group_ranges()
                for rows in self._row_chunks(matrix.shape[0]):
                    view = matrix[rows]
                    permuted = view.index_select(1, self.perm).to(blocks[0].dtype)
                    for group_blocks, coordinates in zip(blocks, ranges):
                        piece = permuted[:, coordinates]
                        if center is None:
                            permuted[:, coordinates] = self._rotate_piece(piece, group_blocks, 1, transpose)
                        else:
                            rotated = self._rotate_piece(piece - shift[coordinates], group_blocks, 1, transpose)
                            permuted[:, coordinates] = piece + rotated
                    view.index_copy_(1, self.perm, permuted.to(matrix.dtype))
                return matrix
            for group, first, count, coordinates, vectors in self._pieces(matrix.shape[1]):
                view = matrix[:, vectors]
                piece = view.index_select(0, coordinates).to(blocks[0].dtype)
                group_blocks = blocks[group][first : first + count]
                if center is None:
                    piece = self._rotate_piece(piece, group_blocks, 0, transpose)
                else:
                    piece = piece + self._rotate_piece(piece - center[coordinates], group_blocks, 0, transpose)
                view.index_copy_(0, coordinates, piece.to(matrix.dtype))
        return matrix

    def _group_ranges(self) -> list[slice]:
        """Each group's range of permuted coordinates."""
        ranges, start = [], 0
        for count, size in self.layout.groups:
            ranges.append(slice(start, start + count * size))
            start += count * size
        return ranges

    @torch.no_grad()
    def backward_(
        self,
        grad: torch.Tensor,
        values: torch.Tensor,
        dim: int,
        transpose: bool = False,
        center: Optional[torch.Tensor] = None,
        through: bool = True,
    ) -> list[torch.Tensor]:
        """The blocks' gradients for `rotate_(values, dim, transpose, center)` given the result's gradient `grad`,
        one (count, size, size) tensor per group; with `through`, `grad` becomes (in place) the gradient of the
        values, Mᵀ·grad (M·grad for the transpose). For u = B·v summed over the vectors, dB = du·vᵀ (v·duᵀ for
        u = Bᵀ·v), in the blocks' dtype."""
        dtype = self.blocks[0].dtype
        if self._on_kernels(grad, dim, transpose):
            # the kernel reads both operands as grad's dtype (a bf16 W0 beside a float32 gradient is cast)
            pick = (lambda t: t.to(grad.dtype)) if dim == 1 else (lambda t: t.t().to(grad.dtype))
            shifted = pick(values) if center is None else (pick(values) - center).to(grad.dtype)
            counts, sizes = [count for count, _ in self.layout.groups], self.layout.sizes
            block_grads = kernels.block_rotate_grad_blocks(shifted, pick(grad), self.perm, counts, sizes, transpose)
            if through:
                self.rotate_(grad, dim, not transpose)
            return block_grads
        block_grads = [torch.zeros_like(group) for group in self.blocks]
        with _full_precision(grad):
            if dim == 1:
                shift = None if center is None else center[self.perm]
                ranges = self._group_ranges()
                for rows in self._row_chunks(grad.shape[0]):
                    grad_view = grad[rows]
                    grads = grad_view.index_select(1, self.perm).to(dtype)
                    shifted = values[rows].index_select(1, self.perm).to(dtype)
                    shifted = shifted if shift is None else shifted - shift
                    rotated = grads.clone() if through else None
                    for group, coordinates in enumerate(ranges):
                        count, size = self.layout.groups[group]
                        grad_piece = grads[:, coordinates].unflatten(-1, (count, size))
                        value_piece = shifted[:, coordinates].unflatten(-1, (count, size))
                        a, b = (value_piece, grad_piece) if transpose else (grad_piece, value_piece)
                        block_grads[group] += torch.bmm(a.permute(1, 2, 0), b.transpose(0, 1))  # over the rows
                        if through:
                            piece = grads[:, coordinates]
                            rotated[:, coordinates] = self._rotate_piece(piece, self.blocks[group], 1, not transpose)
                    if through:
                        grad_view.index_copy_(1, self.perm, rotated.to(grad.dtype))
                return block_grads
            for group, first, count, coordinates, vectors in self._pieces(grad.shape[1]):
                grad_view = grad[:, vectors]
                grad_piece = grad_view.index_select(0, coordinates).to(dtype)
                value_piece = values[:, vectors].index_select(0, coordinates)
                value_piece = value_piece.to(dtype) if center is None else value_piece.to(dtype) - center[coordinates]
                a, b = (value_piece, grad_piece) if transpose else (grad_piece, value_piece)
                size = self.blocks[group].shape[-1]
                # (n·b, vectors) pieces: dB = a·bᵀ per block
                a, b = a.view(count, size, -1), b.view(count, size, -1)
                block_grads[group][first : first + count] += torch.bmm(a, b.transpose(1, 2))
                if through:
                    rotated = self._rotate_piece(
                        grad_piece, self.blocks[group][first : first + count], 0, not transpose
                    )
                    grad_view.index_copy_(0, coordinates, rotated.to(grad.dtype))
        return block_grads

    def inverse(self) -> BlockRotation:
        """The exact inverse (blocks inverted in float64), for when the blocks are only nearly orthogonal."""
        blocks = [torch.linalg.inv(b.double()).to(b.dtype) for b in self.blocks]
        return BlockRotation(self.layout, self.perm, blocks)

    def orthogonalized(self) -> BlockRotation:
        """The same rotation with every block replaced by its closest orthogonal matrix."""
        return BlockRotation(self.layout, self.perm, [nearest_orthogonal(b) for b in self.blocks])


def _packed_groups(layout: BlockLayout, packed: torch.Tensor):
    """(count, b(b−1)/2) views of the packed parameters of each group of blocks, with the groups' block sizes."""
    start = 0
    for count, size in layout.groups:
        stop = start + count * packed_size(size)
        yield packed[start:stop].view(count, packed_size(size)), size
        start = stop


def _blocks_from_packed(
    packed: torch.Tensor, size: int, neumann_terms: int | None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(count, size, size) rotation blocks from (count, b(b−1)/2) packed parameters, in `dtype` (float32 or finer
    by default), by the CUDA kernel where it applies."""
    dtype = dtype or torch.promote_types(packed.dtype, torch.float32)
    with _full_precision(packed):
        packed = packed.to(dtype)
        if _cayley_neumann_on_kernels(packed, size, neumann_terms):
            return kernels.cayley_neumann(packed, size, neumann_terms)
        return rotation_from_skew(skew_from_packed(packed, size), neumann_terms)


def _cayley_neumann_on_kernels(packed: torch.Tensor, size: int, neumann_terms: int | None) -> bool:
    """Whether Cayley–Neumann of these packed parameters (already in their float32 or float64 dtype) runs on the
    CUDA kernel, whose registered backward is then its gradient too."""
    if neumann_terms is None or packed.dtype not in (torch.float32, torch.float64):
        return False
    return kernels.prefer_kernels(
        packed,
        [size],
        "Cayley–Neumann",
        lambda: kernels.cayley_neumann(packed, size, neumann_terms),
        lambda: rotation_from_skew(skew_from_packed(packed, size), neumann_terms),
    )


def packed_gradient(
    layout: BlockLayout, packed: torch.Tensor, block_grads: list[torch.Tensor], neumann_terms: int | None
) -> torch.Tensor:
    """The gradient of the packed skew parameters given their blocks' gradients (one tensor per group).

    Cayley–Neumann is differentiated by hand on the torch path (`cayley_neumann_grad`; the CUDA kernel's fused
    backward and the exact Cayley transform through autograd) a few blocks at a time, so that its temporaries
    (several block-sized tensors per block) never hold more than about 1/PIECES of all the blocks, or
    MIN_PIECE_ELEMENTS.
    """
    grad = torch.zeros_like(packed)
    budget = max(layout.rotated_squares // PIECES, MIN_PIECE_ELEMENTS)
    groups = zip(_packed_groups(layout, packed), _packed_groups(layout, grad), block_grads)
    for (group, size), (group_grad, _), group_block_grads in groups:
        step = max(1, budget // (size * size))
        for first in range(0, group.shape[0], step):
            chunk, chunk_block_grads = group[first : first + step].detach(), group_block_grads[first : first + step]
            group_grad[first : first + step] = _chunk_packed_gradient(chunk, size, chunk_block_grads, neumann_terms)
    return grad


def _chunk_packed_gradient(
    packed: torch.Tensor, size: int, block_grads: torch.Tensor, neumann_terms: int | None
) -> torch.Tensor:
    with _full_precision(packed):
        packed = packed.to(block_grads.dtype)
        if neumann_terms is not None and not _cayley_neumann_on_kernels(packed, size, neumann_terms):
            skew = skew_from_packed(packed, size)
            return packed_gradient_of_skew(cayley_neumann_grad(skew, block_grads, neumann_terms), size)
        leaf = packed.requires_grad_()  # a detached chunk, or its copy in block_grads' dtype
        with torch.enable_grad():
            blocks = _blocks_from_packed(leaf, size, neumann_terms, block_grads.dtype)
            (grad,) = torch.autograd.grad(blocks, leaf, block_grads)
        return grad


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
