#!/usr/bin/env python
"""Every CUDA kernel once, at the shapes that need the most shared memory: what gpu_check.sh runs first.

For each instantiation of KERNEL_NAMES it prints the compiled attributes (registers, static and the largest
allowed dynamic shared memory, threads per block), then launches every kernel at blocks of 8 and of --largest
(512: the biggest tiles `_tile` picks, right under the per-kernel shared-memory limit) and checks that the outputs
are finite. Run it under CUDA_LAUNCH_BLOCKING=1 so that a bad launch fails at its own line, and under
compute-sanitizer (racecheck, synccheck, memcheck) with a small --largest.

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/kernel_smoke.py
    compute-sanitizer --tool racecheck python benchmarks/kernel_smoke.py --largest 32 --rows 8
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

from poet_peft.ops import kernels
from poet_peft.ops.orthogonal import packed_size

# Each rotation kernel: fp32 on CUDA cores and as TF32 on tensor cores, fp64, and the 16-bit tensor-core ones.
VARIANTS = [(torch.float32, False), (torch.float32, True), (torch.float64, False)]
VARIANTS += [(torch.float16, False), (torch.bfloat16, False)]


def exercise_every_kernel(device: torch.device, sizes: tuple[int, ...], rows: int) -> None:
    """Launch every kernel instantiation at each block size of `sizes` on `device`; raise if an output is not finite."""
    for size in sizes:
        for rotation_dtype in (torch.float32, torch.float64):
            packed = torch.randn(2, packed_size(size), device=device, dtype=rotation_dtype) * 0.01
            blocks = kernels.cayley_neumann(packed, size, 3)
            grad_packed = kernels.cayley_neumann_backward(packed, torch.randn_like(blocks), size, 3)
            check_finite(f"cayley_neumann {rotation_dtype} b={size}", blocks, grad_packed)
        perm = torch.randperm(2 * size, device=device)
        for dtype, tf32 in VARIANTS:
            blocks = kernels.cayley_neumann(
                torch.randn(2, packed_size(size), device=device, dtype=kernels.accumulator_dtype(dtype)) * 0.01, size, 3
            )
            x = torch.randn(rows, 2 * size, device=device, dtype=dtype)
            with tf32_matmuls(tf32):
                y = kernels.block_rotate(x, perm, [blocks], False, True)
                grads = kernels.block_rotate_grad_blocks(x, torch.randn_like(y), perm, [2], [size], False)
            check_finite(f"block_rotate {dtype}{' as TF32' if tf32 else ''} b={size}", y, *grads)


@contextlib.contextmanager
def tf32_matmuls(allowed: bool):
    """Let fp32 matmuls (and so fp32 rotations) run as TF32, or not, inside the block."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if allowed else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def check_finite(what: str, *tensors: torch.Tensor) -> None:
    """Raise naming `what` if any tensor holds NaN or inf."""
    if not all(torch.isfinite(tensor).all() for tensor in tensors):
        raise RuntimeError(f"{what}: the kernel wrote non-finite values")


def print_attributes(device: torch.device) -> None:
    """Registers, shared memory and thread limits of every compiled kernel, as the driver reports them."""
    from cupy.cuda import driver

    capability = torch.cuda.get_device_capability(device)
    attributes = {
        "registers": driver.CU_FUNC_ATTRIBUTE_NUM_REGS,
        "static shared B": driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
        "max dynamic shared B": driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        "max threads": driver.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
    }
    print(f"{'kernel':40s} " + " ".join(f"{name:>20s}" for name in attributes))
    for name in kernels.KERNEL_NAMES:
        function = kernels._kernel_function(capability, name)
        values = [driver.funcGetAttribute(attribute, function.ptr) for attribute in attributes.values()]
        print(f"{name:40s} " + " ".join(f"{value:20d}" for value in values))
        if values[3] < kernels.THREADS or values[2] < kernels.SHARED_MEMORY:
            raise RuntimeError(f"{name} cannot launch {kernels.THREADS} threads with {kernels.SHARED_MEMORY} B")


def main() -> None:
    """Print the attributes, launch everything, and say so."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--largest", type=int, default=kernels.MAX_BLOCK, help="the larger block size launched")
    parser.add_argument("--rows", type=int, default=1024, help="activation rows rotated")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_smoke.py needs an NVIDIA GPU (with CuPy: pip install 'poet-peft[cuda]')")
    os.environ[kernels.ENV_VARIABLE] = "cuda"  # the kernels or an error
    device = torch.device("cuda")
    print_attributes(device)
    exercise_every_kernel(device, (8, args.largest), args.rows)
    torch.cuda.synchronize()
    print(f"every kernel launched at b=8 and b={args.largest} with finite outputs")


if __name__ == "__main__":
    main()
