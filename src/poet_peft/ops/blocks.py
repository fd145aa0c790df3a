"""Permuted block-diagonal rotations (POET's stochastic primitives), applied to activations or weights.

A side of a weight (its rows or its columns) of dimension d is rotated by Πᵀ·diag(B₁, …, B_k, I)·Π: Π permutes
the d coordinates, the blocks B_i rotate consecutive runs of the permuted coordinates, and whatever the blocks
do not cover stays put. `BlockLayout` says how the blocks are sized; `BlockRotation` holds one such matrix.
"""

from __future__ import annotations

import contextlib
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


def fully_stochastic_size(dim: int, fraction: float) -> int:
    """POET-FS block size ⌈fraction·dim⌉ (rounding guards against 0.1·30 = 3.0000000000000004)."""
    return math.ceil(round(fraction * dim, 9))


def fully_stochastic_layout(dim: int, fraction: float) -> BlockLayout:
    """POET-FS: a single ⌈fraction·dim⌉ block over a random subset of the coordinates."""
    return BlockLayout(dim, ((1, fully_stochastic_size(dim, fraction)),))


class BlockRotation:
    """The matrix Πᵀ·diag(B₁, …, B_k, I)·Π for one side of a weight, where Π is given by `perm`."""

    def __init__(self, layout: BlockLayout, perm: torch.Tensor, blocks: list[torch.Tensor]):
        self.layout = layout
        self.perm = perm
        self.blocks = blocks

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
        permuted = x.to(blocks[0].dtype).index_select(-1, self.perm)
        pieces, start = [], 0
        equation = "...kj,kji->...ki" if transpose else "...kj,kij->...ki"
        with _full_precision(x):
            for group_blocks, (count, size) in zip(blocks, self.layout.groups):
                segment = permuted[..., start : start + count * size].unflatten(-1, (count, size))
                pieces.append(torch.einsum(equation, segment, group_blocks).flatten(-2))
                start += count * size
        uncovered = permuted[..., start:]
        pieces.append(uncovered if keep_uncovered else torch.zeros_like(uncovered))
        # Scatter back through the permutation; it is a full permutation, so every entry is written.
        return x.new_empty(x.shape).index_copy_(-1, self.perm, torch.cat(pieces, dim=-1).to(x.dtype))

    def inverse(self) -> BlockRotation:
        """The exact inverse (blocks inverted in float64), for when the blocks are only nearly orthogonal."""
        blocks = [torch.linalg.inv(b.double()).to(b.dtype) for b in self.blocks]
        return BlockRotation(self.layout, self.perm, blocks)

    def orthogonalized(self) -> BlockRotation:
        """The same rotation with every block replaced by its closest orthogonal matrix."""
        return BlockRotation(self.layout, self.perm, [nearest_orthogonal(b) for b in self.blocks])


def rotate_weight(
    weight: torch.Tensor, left: Optional[BlockRotation] = None, right: Optional[BlockRotation] = None
) -> torch.Tensor:
    """L·W·M for a weight W of shape (out, in), L acting on its columns and M on its rows; None means identity."""
    if left is not None:  # columns of L·W are L applied to columns of W
        weight = left.apply(weight.transpose(0, 1)).transpose(0, 1)
    if right is not None:  # row i of W·M is Mᵀ applied to row i of W
        weight = right.apply(weight, transpose=True)
    return weight
