"""Numerics of poet_peft.ops against float64 references and closed-form identities."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from poet_peft.ops import blocks as block_ops
from poet_peft.ops.blocks import (
    BlockRotation,
    block_stochastic_layout,
    fully_stochastic_layout,
    packed_gradient,
    permute,
    rotate_weight,
)
from poet_peft.ops.initialization import initial_weight
from poet_peft.ops.orthogonal import (
    cayley,
    cayley_neumann,
    cayley_neumann_grad,
    cayley_neumann_grad_matmuls,
    cayley_neumann_matmuls,
    nearest_orthogonal,
    orthogonality_error,
    packed_gradient_of_skew,
    packed_size,
    skew_from_packed,
)

F64 = torch.float64


def random_skew(size: int, spectral_norm: float, count: int = 3, seed: int = 0) -> torch.Tensor:
    """A batch of float64 skew-symmetric matrices scaled to the given spectral norm."""
    generator = torch.Generator().manual_seed(seed)
    skew = skew_from_packed(torch.randn(count, packed_size(size), generator=generator, dtype=F64), size)
    return skew / torch.linalg.matrix_norm(skew, ord=2)[:, None, None] * spectral_norm


def dense(rotation: BlockRotation) -> torch.Tensor:
    """The dense float64 matrix Πᵀ·diag(B₁, …, I)·Π that a BlockRotation stands for."""
    matrix = torch.eye(rotation.layout.dim, dtype=F64)
    start = 0
    for blocks, (count, size) in zip(rotation.blocks, rotation.layout.groups):
        for k in range(count):
            index = rotation.perm[start + k * size : start + (k + 1) * size]
            matrix[index[:, None], index[None, :]] = blocks[k].to(F64)
        start += count * size
    return matrix


def random_rotation(dim: int, layout, neumann_terms=3, std=0.1, seed=0, dtype=F64) -> BlockRotation:
    """A BlockRotation with random permutation and random skew parameters."""
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randn(layout.num_parameters, generator=generator, dtype=F64) * std
    return BlockRotation.from_packed(layout, torch.randperm(dim, generator=generator), packed, neumann_terms, dtype)


def test_skew_packing_round_trip():
    packed = torch.randn(4, packed_size(7), dtype=F64)
    skew = skew_from_packed(packed, 7)
    assert torch.equal(skew, -skew.transpose(-1, -2))
    rows, cols = torch.triu_indices(7, 7, 1)
    assert torch.equal(skew[:, rows, cols], packed)
    assert packed_size(256) == 32640


def test_exact_cayley_is_orthogonal_and_matches_the_inverse_formula():
    skew = random_skew(16, spectral_norm=0.9)
    eye = torch.eye(16, dtype=F64)
    reference = (eye + skew) @ torch.linalg.inv(eye - skew)
    assert torch.allclose(cayley(skew), reference, atol=1e-13)
    assert orthogonality_error(cayley(skew)).max() < 1e-13


def test_cayley_neumann_three_terms_is_the_papers_polynomial():
    skew = random_skew(8, spectral_norm=0.5)
    eye = torch.eye(8, dtype=F64)
    polynomial = eye + 2 * skew + 2 * skew @ skew + 2 * skew @ skew @ skew + torch.linalg.matrix_power(skew, 4)
    assert torch.allclose(cayley_neumann(skew, 3), polynomial, atol=1e-14)
    assert torch.equal(cayley_neumann(skew, 0), eye + skew)


@pytest.mark.parametrize("terms", [0, 1, 2, 3, 4, 5])
def test_cayley_neumann_makes_the_counted_matmuls_and_equals_its_series(terms):
    skew = random_skew(8, 0.3)
    with FlopCounterMode(display=False) as counter:
        rotation = cayley_neumann(skew, terms)
    assert counter.get_total_flops() == cayley_neumann_matmuls(terms) * 3 * 2 * 8**3
    series = sum(torch.linalg.matrix_power(skew, power) for power in range(terms + 1))
    assert torch.allclose(rotation, (torch.eye(8, dtype=F64) + skew) @ series, atol=1e-14)


@pytest.mark.parametrize("block", [2, 5, 16])
@pytest.mark.parametrize("terms", [0, 1, 2, 3, 4, 5, 6])
def test_cayley_neumann_grad_is_autograds_in_the_counted_matmuls(terms, block):
    # Odd and even term counts take the two shapes of Horner's innermost value; b=2 has a single packed parameter.
    generator = torch.Generator().manual_seed(terms * 31 + block)
    packed = torch.randn(3, packed_size(block), generator=generator, dtype=F64) * 0.3
    grad = torch.randn(3, block, block, generator=generator, dtype=F64)
    leaf = packed.clone().requires_grad_()
    (reference,) = torch.autograd.grad(cayley_neumann(skew_from_packed(leaf, block), terms), leaf, grad)
    with FlopCounterMode(display=False) as counter:
        grad_skew = cayley_neumann_grad(skew_from_packed(packed, block), grad, terms)
    assert counter.get_total_flops() == cayley_neumann_grad_matmuls(terms) * 3 * 2 * block**3
    assert (packed_gradient_of_skew(grad_skew, block) - reference).abs().max() < 1e-13 * reference.abs().max()


@pytest.mark.parametrize("terms", [3, None], ids=["neumann", "exact"])
def test_packed_gradient_equals_autograd_through_the_blocks(terms):
    # BS with a remainder block (20 blocks of 64 and one of 8): each group differentiated on its own, the 20 blocks
    # in two chunks (16 and 4: a chunk holds MIN_PIECE_ELEMENTS' worth of blocks).
    layout = block_stochastic_layout(1288, 64)
    assert layout.groups == ((20, 64), (1, 8)) and block_ops.MIN_PIECE_ELEMENTS // 64**2 == 16
    generator = torch.Generator().manual_seed(4)
    packed = torch.randn(layout.num_parameters, generator=generator, dtype=F64) * 0.2
    leaf = packed.clone().requires_grad_()
    rotation = BlockRotation.from_packed(layout, torch.randperm(1288, generator=generator), leaf, terms)
    block_grads = [torch.randn(group.shape, generator=generator, dtype=F64) for group in rotation.blocks]
    (reference,) = torch.autograd.grad(rotation.blocks, leaf, block_grads)
    assert (packed_gradient(layout, packed, block_grads, terms) - reference).abs().max() < 1e-12


@pytest.mark.parametrize("norm", [0.05, 0.2, 0.5, 0.8])
@pytest.mark.parametrize("terms", [0, 1, 2, 3, 4, 5])
def test_cayley_neumann_error_against_exact_cayley(norm, terms):
    # R_k = C·(I − Q^(k+1)) with C the exact Cayley transform, so ‖R_k − C‖₂ = ‖Q‖₂^(k+1) = λ^(k+1). R_kᵀR_k − I is
    # −2Q^(k+1) + Q^(2k+2) for odd k, of norm 2λ^(k+1) ± λ^(2k+2) (Q^(k+1) = ∓λ^(k+1) on Q's top eigenspace), and
    # −Q^(2k+2) for even k, of norm λ^(2k+2): even k are far more nearly orthogonal.
    skew = random_skew(12, spectral_norm=norm)
    approx, exact = cayley_neumann(skew, terms), cayley(skew)
    distance = torch.linalg.matrix_norm(approx - exact, ord=2)
    assert torch.allclose(distance, torch.full_like(distance, norm ** (terms + 1)), rtol=1e-9)
    gram_error = torch.linalg.matrix_norm(approx.transpose(-1, -2) @ approx - torch.eye(12, dtype=F64), ord=2)
    sign = (-1) ** ((terms + 1) // 2)
    expected = 2 * norm ** (terms + 1) - sign * norm ** (2 * terms + 2) if terms % 2 else norm ** (2 * terms + 2)
    assert torch.allclose(gram_error, torch.full_like(gram_error, expected), rtol=1e-8)


def test_orthogonality_error_shrinks_with_more_terms_for_small_q():
    skew = random_skew(32, spectral_norm=0.3)
    errors = [orthogonality_error(cayley_neumann(skew, k)).max().item() for k in (1, 3, 5)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert orthogonality_error(cayley(skew)).max() < 1e-13


def test_float32_rotation_matches_float64_reference():
    skew = random_skew(64, spectral_norm=0.4)
    reference = cayley_neumann(skew, 3)
    single = cayley_neumann(skew.float(), 3).double()
    assert (single - reference).abs().max() < 1e-6


def test_nearest_orthogonal_of_odd_neumann_is_exact_cayley():
    # For odd k, R_k = C·(I − Q^(k+1)) with I − Q^(k+1) symmetric positive definite: its polar factor is C.
    skew = random_skew(16, spectral_norm=0.6)
    projected = nearest_orthogonal(cayley_neumann(skew, 3))
    assert torch.allclose(projected, cayley(skew), atol=1e-12)
    assert orthogonality_error(projected).max() < 1e-13


@pytest.mark.parametrize(
    "dim, block, groups",
    [
        (512, 256, ((2, 256),)),
        (1280, 256, ((5, 256),)),
        (100, 32, ((3, 32), (1, 4))),
        (65, 16, ((3, 16), (1, 17))),
        (17, 16, ((1, 17),)),
        (16, 16, ((1, 16),)),
    ],
)
def test_block_stochastic_layout_covers_every_coordinate(dim, block, groups):
    layout = block_stochastic_layout(dim, block)
    assert layout.groups == groups
    assert layout.covered == dim
    assert layout.num_parameters == sum(count * size * (size - 1) // 2 for count, size in groups)


@pytest.mark.parametrize(
    "dim, fraction, size", [(512, 0.5, 256), (1376, 0.5, 688), (30, 0.1, 3), (10, 0.25, 3), (64, 1, 64)]
)
def test_fully_stochastic_layout_is_one_ceil_sized_block(dim, fraction, size):
    layout = fully_stochastic_layout(dim, fraction)
    assert layout.groups == ((1, size),)
    assert layout.covered == size


@pytest.mark.parametrize(
    "layout",
    [
        block_stochastic_layout(48, 16),
        block_stochastic_layout(50, 16),
        block_stochastic_layout(49, 16),
        fully_stochastic_layout(48, 0.3),
    ],
    ids=["bs-even", "bs-remainder", "bs-remainder-one", "fs"],
)
def test_block_rotation_equals_its_dense_matrix(layout):
    rotation = random_rotation(layout.dim, layout)
    matrix = dense(rotation)
    x = torch.randn(5, 3, layout.dim, dtype=F64)
    assert torch.allclose(rotation.apply(x), x @ matrix.T, atol=1e-13)
    assert torch.allclose(rotation.apply(x, transpose=True), x @ matrix, atol=1e-13)
    assert torch.allclose(
        rotation.apply_minus_identity(x), x @ (matrix - torch.eye(layout.dim, dtype=F64)).T, atol=1e-13
    )
    assert torch.allclose(dense(rotation.inverse()), torch.linalg.inv(matrix), atol=1e-12)
    assert orthogonality_error(dense(rotation.orthogonalized())) < 1e-13
    columns = torch.randn(layout.dim, 7, dtype=F64)
    assert torch.allclose(rotation.rotate_columns(columns), matrix @ columns, atol=1e-13)
    assert torch.allclose(rotation.rotate_columns(columns.T.contiguous().T, transpose=True), matrix.T @ columns)


@pytest.mark.parametrize("vectors", [80, 700])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize(
    "layout", [block_stochastic_layout(50, 8), fully_stochastic_layout(48, 0.3)], ids=["bs-remainder", "fs"]
)
def test_in_place_rotation_and_its_backward_equal_the_dense_matrix(layout, dim, transpose, dtype, vectors, monkeypatch):
    # With pieces of ≤ 4096 elements the vectors of 48–50 coordinates are rotated in several: 80 vectors make
    # pieces of several blocks, 700 split each block's vectors into ranges. Every piece must land where it came
    # from. bf16 data is rotated in the float64 blocks' dtype.
    monkeypatch.setattr(block_ops, "MIN_PIECE_ELEMENTS", 4096)
    rotation = random_rotation(layout.dim, layout, seed=5)
    matrix = dense(rotation).T if transpose else dense(rotation)
    values = torch.randn(vectors, layout.dim, dtype=F64)
    values = (values.T.contiguous() if dim == 0 else values).to(dtype)  # vectors along `dim`
    center = torch.randn(layout.dim, dtype=F64) if dim == 1 else None
    as_rows = (lambda t: t.double()) if dim == 1 else (lambda t: t.double().T)  # one vector per row
    shift = 0 if center is None else center
    expected = (as_rows(values) - shift) @ matrix.T + shift
    rotated = rotation.rotate_(values.clone(), dim, transpose, center)
    tolerance = 1e-13 if dtype == F64 else 1e-2
    assert torch.allclose(as_rows(rotated), expected, atol=tolerance * 10)
    # u = M·(v − c) + c per vector: dM = Σ du·(v − c)ᵀ, restricted to the blocks; dv = Mᵀ·du
    grad = torch.randn_like(values)
    full_grad = as_rows(grad).T @ (as_rows(values) - shift)
    full_grad = full_grad.T if transpose else full_grad
    through = grad.clone()
    block_grads = rotation.backward_(through, values, dim, transpose, center)
    start = 0
    for group_grads, (count, size) in zip(block_grads, layout.groups):
        for k in range(count):
            index = rotation.perm[start + k * size : start + (k + 1) * size]
            assert torch.allclose(group_grads[k], full_grad[index[:, None], index[None, :]], atol=tolerance * 100)
        start += count * size
    assert torch.allclose(as_rows(through), as_rows(grad) @ matrix, atol=tolerance * 10)
    untouched = grad.clone()
    rotation.backward_(untouched, values, dim, transpose, center, through=False)
    assert torch.equal(untouched, grad)


def test_small_tensors_rotate_in_one_piece_and_large_ones_in_eighths():
    # Per-piece overhead, not memory, bounds a small layer's step: run_clm's tiny model (d=128, 2048 tokens, b=64)
    # cut into eighths spent twice the time of a store-mode step. A large tensor keeps its 1/PIECES bound.
    rotation = random_rotation(128, block_stochastic_layout(128, 64), seed=0)
    assert len(rotation._row_chunks(2048)) == 4  # 2048·128 elements, 4 pieces of MIN_PIECE_ELEMENTS
    assert len(rotation._row_chunks(65536)) == block_ops.PIECES
    assert len(list(rotation._pieces(352))) == 1
    assert len(list(rotation._pieces(65536))) == block_ops.PIECES


def test_permutation_gradient_is_the_inverse_gather():
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 9, dtype=F64, requires_grad=True)
    for dim in (0, -1):
        index = perm[: x.shape[dim]].argsort() if dim == 0 else perm
        assert torch.autograd.gradcheck(lambda t: permute(t, dim, index, index.argsort()), (x,))
    assert torch.equal(permute(x, -1, perm, perm.argsort()), x[:, perm])


def test_rotate_weight_is_left_times_weight_times_right():
    left = random_rotation(40, block_stochastic_layout(40, 16), seed=1)
    right = random_rotation(24, block_stochastic_layout(24, 8), seed=2)
    weight = torch.randn(40, 24, dtype=F64)
    expected = dense(left) @ weight @ dense(right)
    assert torch.allclose(rotate_weight(weight, left, right), expected, atol=1e-12)
    assert torch.allclose(rotate_weight(weight, left=left), dense(left) @ weight, atol=1e-12)
    assert torch.allclose(rotate_weight(weight, right=right), weight @ dense(right), atol=1e-12)


def test_exact_rotations_preserve_singular_values():
    left = random_rotation(64, block_stochastic_layout(64, 16), neumann_terms=None, std=0.3, seed=3)
    right = random_rotation(48, fully_stochastic_layout(48, 0.5), neumann_terms=None, std=0.3, seed=4)
    weight = torch.randn(64, 48, dtype=F64)
    rotated = rotate_weight(weight, left, right)
    assert (rotated - weight).abs().max() > 0.1
    assert torch.allclose(torch.linalg.svdvals(rotated), torch.linalg.svdvals(weight), rtol=1e-12)


def test_initial_weights_have_the_documented_spectra():
    generator = torch.Generator().manual_seed(0)
    normalized = initial_weight("normalized_gaussian", 96, 64, generator)
    assert torch.allclose(normalized.norm(dim=1), torch.ones(96), atol=1e-6)
    uniform = initial_weight("uniform_spectrum", 96, 64, generator)
    assert torch.allclose(torch.linalg.svdvals(uniform), torch.ones(64), atol=1e-5)
    xavier = initial_weight("xavier", 96, 64, generator)
    assert xavier.abs().max() <= (6 / 160) ** 0.5
    assert abs(xavier.var().item() - 2 / 160) < 2e-3
    with pytest.raises(ValueError, match="normalized_gaussian"):
        initial_weight("orthogonal", 4, 4, generator)
