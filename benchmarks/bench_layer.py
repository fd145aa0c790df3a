#!/usr/bin/env python
"""One linear layer's full training step (forward, backward, optimizer) for dense AdamW, POET, PEFT OFT and LoRA.

For every d×d shape and token count the methods are timed alternately in one process: one step of each in turn,
`--repeats` rounds, median per method, reported as a ratio to the dense step of the same shape. The backward starts
from a fixed output gradient, so nothing but the layer is timed. By default the input needs no gradient (the
first layer of a network), so a dense step is the forward x·Wᵀ and the weight gradient, 4·tokens·d² flops;
`--input_grad` adds the input gradient (6·tokens·d²), as for a layer inside a network. POET's flop floor is its
flops over the dense step's on the path `forward_path="auto"` picks: the matmuls, the rotations
(`poet_peft.ops.blocks.rotation_flops`) and Cayley–Neumann, so that the gap to the floor shows.

Peak memory is measured at `--memory_tokens` per method in a fresh process, during building the layer and three
steps, beyond what was held before (so it counts the weights, gradients, optimizer state and activations, not the
input): the bytes torch allocated at the peak (CUDA's max_memory_allocated; on a CPU the CPU allocator's own
count, read from the profiler, which is what a GPU would show) and, on a CPU, the peak resident set, which also
depends on how malloc hands freed memory back.

    python benchmarks/bench_layer.py --record benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from itertools import product
from pathlib import Path
from typing import Callable, Optional

import torch
from allocations import PeakAllocation
from peft import LoraConfig, OFTConfig, get_peft_model
from reporting import publish
from tqdm.auto import tqdm

from poet_peft import POETConfig
from poet_peft.ops import kernels
from poet_peft.ops.blocks import block_stochastic_layout, fully_stochastic_layout, placement_cost, rotation_flops
from poet_peft.ops.orthogonal import cayley_neumann_grad_matmuls, cayley_neumann_matmuls

NEUMANN_TERMS = POETConfig().neumann_terms


class OneLinear(torch.nn.Module):
    """A single bias-free d×d linear layer, the unit every method is compared on."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass(frozen=True)
class Method:
    """A row of the table: how to wrap the layer, and POET's layouts and forward path for the flop floor."""

    name: str
    wrap: Callable[[torch.nn.Module, int], torch.nn.Module]
    poet: Optional[tuple[str, float, str, str]] = None  # (mode, block, forward_path, memory_mode)


def poet_method(mode: str, block: float, path: str, memory_mode: str = "recompute") -> Method:
    """POET-BS or -FS on the layer, with the forward path forced or auto, in a memory mode (labelled unless default)."""
    label = f"POET-{mode.upper()} b={block if mode == 'bs' else '1/' + str(round(1 / block))}, {path}"
    label += ", store" if memory_mode == "store" else ""
    config = dict(block=block, mode=mode, forward_path=path, target_modules=["proj"], merge_every=None)
    config["memory_mode"] = memory_mode
    return Method(
        label, lambda layer, dim: get_peft_model(layer, POETConfig(**config)), (mode, block, path, memory_mode)
    )


def oft_method(block: int) -> Method:
    """PEFT's OFT with the same block size: one-sided, rotating the input (Cayley–Neumann, 5 terms by default)."""
    config = dict(oft_block_size=block, r=0, target_modules=["proj"])
    return Method(f"PEFT OFT b={block}", lambda layer, dim: get_peft_model(layer, OFTConfig(**config)))


def lora_method(rank: int) -> Method:
    """PEFT's LoRA of rank r beside the frozen weight."""
    return Method(
        f"PEFT LoRA r={rank}",
        lambda layer, dim: get_peft_model(layer, LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"])),
    )


def methods(blocks: list[int], lora_rank: int) -> list[Method]:
    """Dense first (every ratio is to it), then POET-BS per block and path (the largest block also weight-centric
    with memory_mode="store"), POET-FS 1/2, OFT per block, LoRA."""
    rows = [Method("dense + AdamW", lambda layer, dim: layer)]
    rows += [poet_method("bs", block, path) for block in blocks for path in ("weight", "input", "auto")]
    rows += [poet_method("bs", max(blocks), "weight", memory_mode="store")]
    rows += [poet_method("fs", 0.5, "auto")]
    rows += [oft_method(block) for block in blocks]
    return rows + [lora_method(lora_rank)]


def cayley_products(device: torch.device) -> int:
    """Block matmuls per Cayley–Neumann forward: the torch path's Horner count, or the CUDA kernel's k + 1."""
    on_kernels = kernels.use_kernels(torch.empty(1, device=device), [8])
    return NEUMANN_TERMS + 1 if on_kernels else cayley_neumann_matmuls(NEUMANN_TERMS)


def poet_floor(method: Method, dim: int, tokens: int, input_grad: bool, products: int) -> Optional[float]:
    """POET's flops over the dense step's (4·tokens·d², 6· with --input_grad) on the path auto takes; None for others.

    The extra flops are the rotations (`rotation_flops`; with memory_mode="recompute" the input's and weight's
    rotations run again, and the matmul where R acts on the outputs) plus Cayley–Neumann: `products` matmuls of 2b³
    flops per block and build (the forward's, and with memory_mode="recompute" the backward's: "store" keeps the
    blocks), and the `cayley_neumann_grad_matmuls` of its written-out gradient.
    """
    if method.poet is None:
        return None
    mode, block, path, memory_mode = method.poet
    recompute = memory_mode == "recompute"
    layout = block_stochastic_layout(dim, block) if mode == "bs" else fully_stochastic_layout(dim, block)
    paths = {"weight": [(True, True)], "input": [(False, False)], "auto": list(product((True, False), repeat=2))}
    cost = lambda sides: placement_cost(layout, layout, tokens, sides, True, input_grad, recompute)  # noqa: E731
    sides = min(paths[path], key=cost)
    step = rotation_flops(layout, layout, tokens, *sides, True, input_grad, recompute)
    cubes = sum(count * size**3 for count, size in layout.groups)
    builds = 2 if recompute else 1
    cayley = 2 * 2 * (builds * products + cayley_neumann_grad_matmuls(NEUMANN_TERMS)) * cubes  # R and P
    return (step + cayley) / ((6 if input_grad else 4) * tokens * dim * dim)


def training_step(model: torch.nn.Module, x: torch.Tensor, autocast: bool) -> Callable[[], None]:
    """One forward (bf16 autocast on a GPU), backward from a fixed output gradient, and AdamW step of `model`.

    The backward starts from a given gradient rather than a loss, so that nothing but the layer is timed.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    output_grad = torch.randn_like(x) / x.numel() ** 0.5

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            output = model(x)
        output.backward(output_grad.to(output.dtype))
        optimizer.step()

    return step


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_input(dim: int, tokens: int, device: torch.device, input_grad: bool) -> torch.Tensor:
    """The seeded (tokens, d) input; with `input_grad` it wants a gradient, as inside a network."""
    torch.manual_seed(0)
    return torch.randn(tokens, dim, device=device, requires_grad=input_grad)


def time_methods(rows: list[Method], x: torch.Tensor, repeats: int) -> list[float]:
    """Median ms per step of each method, timed alternately (one step of each per round) after two warm-up rounds."""
    dim, device = x.shape[1], x.device
    steps = [training_step(row.wrap(OneLinear(dim), dim).to(device), x, device.type == "cuda") for row in rows]
    times = [[] for _ in rows]
    for round_index in range(repeats + 2):
        for step, samples in zip(steps, times):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_index >= 2:
                samples.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(samples) for samples in times]


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident set size now (VmRSS), or its peak since the last `reset_peak_resident` (VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field + ":")).split()[1]) * 1024


def reset_peak_resident() -> None:
    """Make the kernel's high-water mark of resident memory start again from now (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_probe(row: Method, x: torch.Tensor, warm_dim: int) -> tuple[int, Optional[int]]:
    """Bytes the method's layer, optimizer and three training steps held at their peak, beyond the input: allocated
    by torch (exact: CUDA's max_memory_allocated, or the CPU allocator's own count) and, on a CPU, resident."""
    dim, device = x.shape[1], x.device
    # A first step on a small warm_dim × warm_dim layer loads the code and thread pools of every op the method
    # uses, which would otherwise count against it.
    training_step(row.wrap(OneLinear(warm_dim), warm_dim).to(device), x[:16, :warm_dim].detach(), False)()

    def run() -> None:
        step = training_step(row.wrap(OneLinear(dim), dim).to(device), x, device.type == "cuda")
        for _ in range(3):
            step()
        synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        return torch.cuda.max_memory_allocated(device) - before, None
    reset_peak_resident()
    before = resident_bytes()
    run()
    resident = resident_bytes("VmHWM") - before
    with PeakAllocation() as allocated:
        run()
    return allocated.bytes, resident


def peak_memory(method_index: int, args: argparse.Namespace, dim: int, tokens: int) -> tuple[int, Optional[int]]:
    """Run `peak_memory_probe` in a fresh process, so that no other method's peak is counted."""
    command = [sys.executable, __file__, "--memory_probe", f"{method_index},{dim},{tokens}"]
    command += ["--blocks", *map(str, args.blocks), "--lora_rank", str(args.lora_rank)]
    command += ["--input_grad"] if args.input_grad else []
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"memory probe {command} failed:\n{result.stderr[-3000:]}")
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))


def shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(d, tokens) pairs, leaving out those whose dense step exceeds --max_dense_gflop (time on a CPU)."""
    return [(d, t) for d in args.dims for t in args.tokens if 4 * t * d * d / 1e9 <= args.max_dense_gflop]


def main() -> None:
    """Time every method on every shape, probe peak memory, and print (and optionally record) the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (after two warm-up rounds)")
    parser.add_argument(
        "--max_dense_gflop",
        type=float,
        default=1e9 if gpu else 140.0,
        help="skip shapes whose dense step is more flops than this (on a CPU d=4096 at 8192 tokens is 550 GFLOP)",
    )
    parser.add_argument("--input_grad", action="store_true", help="the input wants a gradient (a layer inside a net)")
    parser.add_argument(
        "--memory_tokens", type=int, default=2048, help="probe peak memory (one process per method) at this count"
    )
    parser.add_argument("--memory_probe", help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    if args.memory_tokens not in args.tokens:
        parser.error(
            f"--memory_tokens {args.memory_tokens} is not one of --tokens {args.tokens}: memory is probed there"
        )
    device = torch.device("cuda" if gpu else "cpu")
    rows = methods(args.blocks, args.lora_rank)
    if args.memory_probe:
        index, dim, tokens = map(int, args.memory_probe.split(","))
        x = layer_input(dim, tokens, device, args.input_grad)
        print(json.dumps(peak_memory_probe(rows[index], x, warm_dim=math.lcm(*args.blocks))))
        return

    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()} CPU"
    threads = "" if gpu else f", {torch.get_num_threads()} threads"
    started = time.perf_counter()
    results = {}
    for dim, tokens in tqdm(shapes(args), desc="shapes"):
        times = time_methods(rows, layer_input(dim, tokens, device, args.input_grad), args.repeats)
        probe = tokens == args.memory_tokens
        memory = [peak_memory(i, args, dim, tokens) if probe else None for i in range(len(rows))]
        results[dim, tokens] = (times, memory)

    command = (
        f"`python benchmarks/bench_layer.py --dims {' '.join(map(str, args.dims))} --tokens "
        f"{' '.join(map(str, args.tokens))} --blocks {' '.join(map(str, args.blocks))} --lora_rank {args.lora_rank} "
        f"--repeats {args.repeats} --max_dense_gflop {args.max_dense_gflop:g} --memory_tokens {args.memory_tokens}"
        f"{' --input_grad' if args.input_grad else ''}`"
    )
    lines = [
        f"Layer benchmark, {date.today()}, {name}{threads}, torch {torch.__version__}, "
        f"{'bf16 autocast' if gpu else 'fp32'}, {time.perf_counter() - started:.0f} s",
        command,
        "",
        "| d | tokens | method | ms per step | × dense | POET flop floor | peak allocated (MiB) | × dense memory "
        "| peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (dim, tokens), (times, memory) in results.items():
        for row, ms, mem in zip(rows, times, memory):
            floor = poet_floor(row, dim, tokens, args.input_grad, cayley_products(device))
            allocated, resident = mem or (None, None)
            dense_allocated = max(memory[0][0], 1) if mem else 1
            lines.append(
                f"| {dim} | {tokens} | {row.name} | {ms:.2f} | {ms / times[0]:.3f} | "
                f"{'' if floor is None else f'{floor:.3f}'} | {'' if mem is None else f'{allocated / 2**20:.1f}'} | "
                f"{'' if mem is None else f'{allocated / dense_allocated:.2f}'} | "
                f"{'' if resident is None else f'{resident / 2**20:.1f}'} |"
            )
    publish("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
