#!/usr/bin/env python
"""POET's CUDA kernels against the torch reference and PEFT OFT: Cayley–Neumann and the rotation of activations.

Two tables, each measured side by side in one process (forward + backward, median of `--repeats`):
1. Cayley–Neumann: d/b rotation blocks of size b from packed skew parameters (3 Neumann terms): our kernel, our
   torch reference, and PEFT OFT's `_cayley_batch`.
2. The input-centric rotation of `--tokens` activations of width d in each of `--dtypes` (blocks built, then
   applied), forward only and forward + backward: kernels, torch reference, and PEFT OFT's rotation module (which
   does not permute).
3. Host time per call of a rotation too small for the device to matter (launch and Python overhead).
A layer's whole training step against dense AdamW, PEFT OFT and LoRA is `bench_layer.py`'s.

    python benchmarks/bench_ops.py --record benchmarks/RESULTS.md

On a machine without a GPU it runs on the CPU (smaller by default) and shows the kernel columns as n/a.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Callable, Optional

import torch
from peft.tuners.oft.layer import OFTRotationModule
from reporting import publish
from tqdm.auto import tqdm

from poet_peft.ops import kernels
from poet_peft.ops.blocks import BlockRotation, block_stochastic_layout
from poet_peft.ops.orthogonal import cayley_neumann, packed_size, skew_from_packed

TERMS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def kernel_path(mode: str):
    """Run the enclosed code with POET_PEFT_KERNELS set to `mode`."""
    previous = os.environ.get(kernels.ENV_VARIABLE)
    os.environ[kernels.ENV_VARIABLE] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(kernels.ENV_VARIABLE)
        else:
            os.environ[kernels.ENV_VARIABLE] = previous


def milliseconds(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median wall time of `step` in ms, after warm-up (which also compiles the kernels)."""
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def kernels_usable(device: torch.device) -> bool:
    """Whether the CUDA kernels can run here."""
    with kernel_path("auto"):
        return kernels.use_kernels(torch.empty(1, device=device), [8])


def cayley_row(block: int, dim: int, device: torch.device, repeats: int) -> list[Optional[float]]:
    """ms for kernel, torch reference and PEFT OFT to build (and backpropagate through) d/b blocks."""
    count = dim // block
    packed = (torch.randn(count, packed_size(block), device=device) * 0.01).requires_grad_(True)
    grad = torch.randn(count, block, block, device=device)
    oft = OFTRotationModule(count, packed_size(block), block, dim, num_cayley_neumann_terms=TERMS).to(device)

    def backward(build: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: build().backward(grad)

    steps = [
        backward(lambda: kernels.cayley_neumann(packed, block, TERMS)) if kernels_usable(device) else None,
        backward(lambda: cayley_neumann(skew_from_packed(packed, block), TERMS)),
        backward(lambda: oft._cayley_batch(packed, block, True, TERMS)),
    ]
    return [milliseconds(step, device, repeats) if step else None for step in steps]


def rotation_row(
    block: int, dim: int, tokens: int, dtype: torch.dtype, backward: bool, device: torch.device, repeats: int
) -> list[Optional[float]]:
    """ms for kernels, torch reference and PEFT OFT to rotate activations (blocks built each time), forward only
    (no autograd) or forward + backward."""
    layout = block_stochastic_layout(dim, block)
    perm = torch.randperm(dim, device=device)
    packed = (torch.randn(layout.num_parameters, device=device) * 0.01).requires_grad_(backward)
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=backward)
    grad = torch.randn_like(x)
    oft = OFTRotationModule(dim // block, packed_size(block), block, dim, num_cayley_neumann_terms=TERMS).to(device)

    def timed(rotate: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            if backward:
                rotate().backward(grad)
            else:
                with torch.no_grad():
                    rotate()

        return step

    def ours(mode: str) -> Callable[[], None]:
        def rotate() -> torch.Tensor:
            with kernel_path(mode):
                return BlockRotation.from_packed(layout, perm, packed, TERMS).apply(x)

        return timed(rotate)

    steps = [ours("cuda") if kernels_usable(device) else None, ours("torch"), timed(lambda: oft(x))]
    return [milliseconds(step, device, repeats) if step else None for step in steps]


def host_microseconds(device: torch.device, mode: str, calls: int = 200) -> Optional[float]:
    """Host time per call (µs) of a rotation too small for the device to matter: 16 tokens, d=256, b=64, forward,
    the calls queued back to back and synchronized once."""
    if mode == "cuda" and not kernels_usable(device):
        return None
    layout = block_stochastic_layout(256, 64)
    perm, packed = torch.randperm(256, device=device), torch.randn(layout.num_parameters, device=device) * 0.01
    x = torch.randn(16, 256, device=device)
    with kernel_path(mode), torch.no_grad():
        for _ in range(10):
            BlockRotation.from_packed(layout, perm, packed, TERMS).apply(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            BlockRotation.from_packed(layout, perm, packed, TERMS).apply(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def cell(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    return "n/a" if numerator is None or denominator is None else f"{numerator / denominator:.2f}×"


def comparison_rows(results: dict) -> list[str]:
    """Markdown rows of (shape…) → (kernel, torch reference, PEFT OFT) timings, with the kernel's speed-ups."""
    return [
        f"| {' | '.join(map(str, shape))} | {cell(kernel)} | {cell(reference)} | {cell(oft)} "
        f"| {ratio(reference, kernel)} | {ratio(oft, kernel)} |"
        for shape, (kernel, reference, oft) in results.items()
    ]


def main() -> None:
    """Measure the three tables and print (and optionally record) them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 256, 512] if gpu else [32, 64])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096] if gpu else [256, 512])
    parser.add_argument("--tokens", type=int, default=8192 if gpu else 512)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20 if gpu else 3)
    parser.add_argument("--record", type=Path, default=None, help="append the tables to this Markdown file")
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()} CPU"

    shapes = [(b, d) for b in args.blocks for d in args.dims if d % b == 0]
    cayley, rotation = {}, {}
    for block, dim in tqdm(shapes, desc="Cayley–Neumann and rotations"):
        cayley[block, dim] = cayley_row(block, dim, device, args.repeats)
        for dtype, backward in [(dtype, backward) for dtype in args.dtypes for backward in (False, True)]:
            times = rotation_row(block, dim, args.tokens, DTYPES[dtype], backward, device, args.repeats)
            rotation[block, dim, dtype, "forward + backward" if backward else "forward"] = times
    host = {mode: host_microseconds(device, mode) for mode in ("cuda", "torch")}

    lines = [
        f"Kernel benchmark, {date.today()}, {name}, torch {torch.__version__}",
        f"`python benchmarks/bench_ops.py --blocks {' '.join(map(str, args.blocks))} --dims "
        f"{' '.join(map(str, args.dims))} --tokens {args.tokens} --dtypes {' '.join(args.dtypes)} --repeats "
        f"{args.repeats}` (ms, median of {args.repeats})",
        "",
        f"Cayley–Neumann ({TERMS} terms), d/b blocks, forward + backward:",
        "",
        "| b | d | kernel | torch reference | PEFT OFT | kernel speed-up vs torch | vs OFT |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += comparison_rows(cayley)
    lines += [
        "",
        f"Input-centric rotation of {args.tokens}×d activations (blocks built, then applied):",
        "",
        "| b | d | dtype | pass | kernels | torch reference | PEFT OFT (no permutation) | speed-up vs torch | vs OFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += comparison_rows(rotation)
    lines += [
        "",
        f"Host time per rotation call, 16 tokens, d=256, b=64, forward: kernels {cell(host['cuda'])} µs, torch "
        f"{cell(host['torch'])} µs",
    ]
    publish("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
