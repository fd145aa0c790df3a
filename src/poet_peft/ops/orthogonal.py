"""Skew-symmetric packing and the Cayley maps that turn skew-symmetric matrices into rotations."""

from __future__ import annotations

import functools

import torch


def packed_size(block: int) -> int:
    """Number of free parameters of a block×block skew-symmetric matrix: b(b−1)/2."""
    return block * (block - 1) // 2


@functools.lru_cache(maxsize=None)
def _triangle_indices(block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into a block×block matrix of its strict upper triangle, row by row, and of their mirror images
    below the diagonal."""
    # Made outside inference mode even when first asked for inside it: an inference tensor would poison backward.
    with torch.inference_mode(False):
        rows, cols = torch.triu_indices(block, block, 1, device=device)
        return rows * block + cols, cols * block + rows


def skew_from_packed(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Skew-symmetric matrices Q = U − Uᵀ from their packed strict upper triangles, shape (..., b(b−1)/2)."""
    upper_indices, _ = _triangle_indices(block, packed.device)
    upper = packed.new_zeros(*packed.shape[:-1], block * block)
    upper = upper.index_copy_(-1, upper_indices, packed).unflatten(-1, (block, block))
    return upper - upper.transpose(-1, -2)


def _identity_like(matrices: torch.Tensor) -> torch.Tensor:
    return torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device).expand_as(matrices)


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform (I + Q)(I − Q)⁻¹ of a batch of skew-symmetric matrices."""
    eye = _identity_like(skew)
    # (I − Q)⁻¹ and (I + Q) commute, so solving (I − Q) R = (I + Q) gives the same R.
    return torch.linalg.solve(eye - skew, eye + skew)


def _horner_in_square(terms: int) -> tuple[tuple[float, float, float], list[tuple[float, float]]]:
    """Σ c_j Q^j with c = 1, 2, …, 2, 1 (terms ≥ 1) by Horner's scheme in Q²: the innermost value's coefficients of
    Q², I and Q, then the (I, Q) coefficients added after each multiplication by Q², innermost first."""
    coefficients = [1.0] + [2.0] * terms + [1.0]
    if len(coefficients) % 2:  # the top power is even: c_top·Q² joins the innermost pair, without a matmul
        innermost, remaining = (coefficients[-1], coefficients[-3], coefficients[-2]), coefficients[:-3]
    else:
        innermost, remaining = (0.0, coefficients[-2], coefficients[-1]), coefficients[:-2]
    return innermost, [(remaining[start], remaining[start + 1]) for start in range(len(remaining) - 2, -1, -2)]


def _add_pair(result: torch.Tensor, skew: torch.Tensor, constant: float, linear: float) -> torch.Tensor:
    # result + constant·I + linear·Q, in place: no block-sized temporaries beside the matmuls' own
    result.add_(skew, alpha=linear).diagonal(dim1=-2, dim2=-1).add_(constant)
    return result


def _innermost(skew: torch.Tensor, square: torch.Tensor, coefficients: tuple[float, float, float]) -> torch.Tensor:
    square_coefficient, constant, linear = coefficients
    # c·Q² + b·Q in one pass over the block: c is 1 or 0 (Horner's innermost value is Q² + 2Q + 2I or Q + 2I)
    start = torch.add(square, skew, alpha=linear) if square_coefficient else skew * linear
    start.diagonal(dim1=-2, dim2=-1).add_(constant)
    return start


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """Cayley–Neumann map (I + Q)(I + Q + … + Q^terms): (I − Q)⁻¹ replaced by its truncated Neumann series."""
    # Expanded, the map is Σ c_j Q^j with c = 1, 2, …, 2, 1. Evaluated as Σ (c_2i I + c_2i+1 Q)(Q²)^i by Horner's
    # scheme in Q², it costs `cayley_neumann_matmuls(terms)` matmuls, not terms + 1: 2 instead of 4 for 3 terms.
    if terms == 0:
        return _identity_like(skew) + skew
    innermost, outer = _horner_in_square(terms)
    square = skew @ skew
    result = _innermost(skew, square, innermost)
    for constant, linear in outer:
        result = _add_pair(square @ result, skew, constant, linear)
    return result


def cayley_neumann_grad(skew: torch.Tensor, grad: torch.Tensor, terms: int) -> torch.Tensor:
    """A matrix whose skew-symmetric part is that of the gradient with respect to Q of ⟨grad, cayley_neumann(Q,
    terms)⟩, written out: all that reaches a skew-symmetric Q (`packed_gradient_of_skew` keeps only that part).

    Horner's scheme run backwards: for R' = Q²·R + a·I + b·Q, the gradient G of R' gives Q² the gradient G·Rᵀ,
    Q the gradient b·G, and R the gradient (Q²)ᵀ·G; then Q² = Q·Q passes its gradient S̄ on as S̄·Qᵀ + Qᵀ·S̄. For a
    skew Q the skew part of that is the skew part of −T·Q with T = S̄ + S̄ᵀ symmetric (since Q·T = −(T·Q)ᵀ): one
    product instead of two. Only Q² and the values Horner multiplies are rebuilt (`cayley_neumann_grad_matmuls`
    products in all), and no autograd graph is kept: cheaper in time and memory than autograd through
    `cayley_neumann`.
    """
    if terms == 0:
        return grad.clone()
    shape, size = skew.shape, skew.shape[-1]
    skew, grad = skew.reshape(-1, size, size), grad.reshape(-1, size, size)  # baddbmm fuses a product and a sum
    innermost, outer = _horner_in_square(terms)
    square = skew @ skew
    multiplied = [_innermost(skew, square, innermost)]  # the value each multiplication by Q² acts on
    for constant, linear in outer[:-1]:
        multiplied.append(_add_pair(square @ multiplied[-1], skew, constant, linear))
    # The gradient reaching each Horner step, outermost first (Q² is symmetric, so (Q²)ᵀ·G = Q²·G).
    step_grads = [grad]
    for _ in outer:
        step_grads.append(square @ step_grads[-1])
    # Q's and Q²'s gradients start from the innermost value's share, so that no zero-filled block is summed into.
    square_coefficient, _, innermost_linear = innermost
    grad_skew, grad_square = step_grads[-1] * innermost_linear, step_grads[-1] * square_coefficient
    for (_, linear), value, step_grad in zip(reversed(outer), reversed(multiplied), step_grads):
        grad_skew.add_(step_grad, alpha=linear)
        grad_square = torch.baddbmm(grad_square, step_grad, value.mT)
    return torch.baddbmm(grad_skew, grad_square + grad_square.mT, skew, alpha=-1).view(shape)


def packed_gradient_of_skew(grad_skew: torch.Tensor, block: int) -> torch.Tensor:
    """The gradient of the packed parameters, shape (..., b(b−1)/2), given that of Q = U − Uᵀ (`skew_from_packed`)."""
    upper_indices, lower_indices = _triangle_indices(block, grad_skew.device)
    flat = grad_skew.flatten(-2)
    return flat.index_select(-1, upper_indices) - flat.index_select(-1, lower_indices)


def cayley_neumann_matmuls(terms: int) -> int:
    """Matrix products `cayley_neumann` makes per block in its forward pass: 1 + ⌊terms/2⌋ (none for terms = 0)."""
    return 0 if terms == 0 else 1 + terms // 2


def cayley_neumann_grad_matmuls(terms: int) -> int:
    """Matrix products `cayley_neumann_grad` makes per block: Q², the values Horner multiplies but the first, two
    per multiplication by Q² and one for Q² = Q·Q (none for terms = 0)."""
    if terms == 0:
        return 0
    multiplications = cayley_neumann_matmuls(terms) - 1  # by Q², in Horner's scheme
    return 1 + max(multiplications - 1, 0) + 2 * multiplications + 1


def rotation_from_skew(skew: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """Rotations from skew-symmetric matrices: Cayley–Neumann with `neumann_terms`, or exact Cayley if None."""
    if neumann_terms is None:
        return cayley(skew)
    return cayley_neumann(skew, neumann_terms)


def orthogonality_error(matrices: torch.Tensor) -> torch.Tensor:
    """‖WWᵀ − I‖_F of each matrix in a batch (‖WᵀW − I‖_F for tall ones): zero iff rows (columns) are orthonormal."""
    wide = matrices.shape[-2] <= matrices.shape[-1]
    gram = matrices @ matrices.transpose(-1, -2) if wide else matrices.transpose(-1, -2) @ matrices
    return torch.linalg.matrix_norm(gram - _identity_like(gram))


def random_orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random float64 (rows, cols) matrix with orthonormal rows (rows ≤ cols) or columns (rows > cols)."""
    tall = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(tall)
    # QR alone is not Haar: LAPACK's sign convention biases Q. Making diag(R) positive fixes the factorisation
    # uniquely, and the result is then exactly Haar-distributed (Mezzadri 2007).
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.t().contiguous() if rows <= cols else q


def nearest_orthogonal(matrices: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U Vᵀ of each matrix: its closest orthogonal matrix in Frobenius norm."""
    u, _, vh = torch.linalg.svd(matrices.double())
    return (u @ vh).to(matrices.dtype)
