#!/usr/bin/env python
"""Memory and time of one training step of run_clm.py's methods at the paper's model shapes.

Each row runs in a fresh process. It builds the model as `run_clm.py --method …` would (the same wrapping, optimizer
groups and optimizer: POET trains embeddings, norms and lm_head in place, PEFT's LoRA keeps them as
modules_to_save copies beside frozen originals), runs training steps on random tokens, and reports:

- exact accounting: parameters and buffers, gradients, the optimizer's state after a step (read from
  `optimizer.state`: AdamW's moments, GaLore's projected moments and projectors), and the tensors autograd saves
  for the backward that are not parameter or buffer storage (`torch.autograd.graph.saved_tensors_hooks`), each
  storage counted once;
- the peak of the bytes torch allocated (`torch.cuda.max_memory_allocated` on a GPU; on a CPU the CPU
  allocator's own count over building the model and the first two steps, read from the profiler);
- the process's peak resident set, and how far it grew from before the model was built (on a GPU: the peak
  allocated);
- the median time of the steps after two warm-up steps (time only on a quiet machine).

With `--ranks N` a row runs as N processes (torchrun, gloo on a CPU) with FSDP2: `fully_shard` on every decoder
layer and the model, as run_clm.py does under examples/configs/fsdp2.yaml; each rank takes its own batch, and the
row reports rank 0's share (parameters, gradients and optimizer state are the rank's shards).

Every finished row is appended to --results as a JSON line and a rerun skips the rows already there, so a long
sweep resumes where it stopped. The table of all rows asked for is printed (and appended to --record).

    python benchmarks/bench_memory.py --shapes 60m --batches 4x256 1x1024 --precisions fp32 bf16 \\
        --record benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import run_clm  # noqa: E402
from allocations import PeakAllocation  # noqa: E402
from reporting import publish  # noqa: E402

from poet_peft.sharding import is_sharded  # noqa: E402

SHAPES = ("60m", "130m", "350m", "1b")  # the paper's architectures (ANCHORS), as run_clm builds them
METHODS = [
    "adamw",
    "poet --block 256",
    "poet --block 256 --memory_mode store",
    "poet --block 64",
    "poet --block 64 --memory_mode store",
    "poet --mode fs --block 0.5",
    "poet --block 256 --base_dtype bfloat16",
    "lora --lora_r 64",
    "galore",
]
KINDS = ("parameters", "gradients", "optimizer", "saved")
MIB = 2**20


class Vocabulary:
    """What run_clm.build_model asks of a tokenizer: its size and special token ids."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def tensor_bytes(value, seen: dict[int, int]) -> None:
    """Add the storages of every tensor inside value (nested containers and plain objects such as GaLore's
    projectors) to seen, keyed by storage pointer."""
    if isinstance(value, torch.Tensor):
        value = value.to_local() if is_sharded(value) else value  # FSDP2: the rank's own shard
        seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    elif isinstance(value, dict):
        for item in value.values():
            tensor_bytes(item, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            tensor_bytes(item, seen)
    elif hasattr(value, "__dict__"):
        tensor_bytes(vars(value), seen)


def peak_resident_mib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(row: dict) -> dict:
    """One row, in this process: accounting of the first step, peak memory, and the median time of later steps."""
    device = torch.device(row["device"])
    batch, length = map(int, row["batch"].split("x"))
    flags = row["method"].split()
    args = run_clm.parse_args(
        ["--method", flags[0], *flags[1:], "--model_size", row["shape"], "--block_size", str(length)]
    )
    torch.manual_seed(0)
    before = peak_resident_mib()
    # On a CPU the allocator's own peak is read over building the model and the first two steps (outside the timing).
    allocation = contextlib.ExitStack()
    allocated = allocation.enter_context(PeakAllocation()) if device.type == "cpu" else None
    method = run_clm.METHODS[args.method]
    model = method.wrap(run_clm.build_model(args, Vocabulary(row["vocab"])), args).to(device)
    sharded = row.get("ranks", 1) > 1
    rank = shard(model, device) if sharded else 0
    optimizer = method.optimizer(method.param_groups(model, args))
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, row["vocab"], (batch, length), generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=row["precision"] == "bf16")
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if not is_sharded(t)}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        # Under FSDP2 a layer's parameters are gathered whole for its forward (and freed after it): parameter
        # storage, like the unsharded run's, so not counted as saved.
        gathered = {t.untyped_storage().data_ptr() for t in model.parameters() if not is_sharded(t)} if sharded else ()
        if pointer not in own and pointer not in gathered:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    counts, times = {}, []
    # Step 0 is counted (saved tensors, gradients), steps 0 and 1 are watched by the allocation peak (from step 1 on
    # the optimizer's state is there during the forward and backward), and the steps after them are timed.
    for step in range(2 + row["steps"]):
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if step == 0 else contextlib.nullcontext()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with hooks, autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if step == 0:
            gradients: dict[int, int] = {}
            tensor_bytes([p.grad for p in model.parameters() if p.grad is not None], gradients)
            counts["gradients"] = sum(gradients.values())
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        if step == 1:
            allocation.close()
    storage: dict[int, int] = {}
    tensor_bytes([*model.parameters(), *model.buffers()], storage)
    state: dict[int, int] = {}
    tensor_bytes(list(optimizer.state.values()), state)
    counts.update(parameters=sum(storage.values()), optimizer=sum(state.values()), saved=sum(saved.values()))
    peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else peak_resident_mib()
    return {
        **row,
        **counts,
        "allocated_mib": torch.cuda.max_memory_allocated(device) / MIB if allocated is None else allocated.bytes / MIB,
        "peak_mib": peak,
        "growth_mib": peak - (0 if device.type == "cuda" else before),
        "step_s": statistics.median(times[2:]) if len(times) > 2 else None,
        "torch": torch.__version__,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
    }


def shard(model: torch.nn.Module, device: torch.device) -> int:
    """Join the torchrun group and shard `model` with FSDP2 as Accelerate's fsdp2.yaml would; returns the rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in model.modules():
        if type(module).__name__ == "LlamaDecoderLayer":
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return dist.get_rank()


def row_key(row: dict) -> tuple:
    """What identifies a row in the results file."""
    fields = ("shape", "batch", "precision", "method", "vocab", "device", "steps")
    return (*(row[key] for key in fields), row.get("ranks", 1))  # rows from before --ranks ran in one process


def run_in_fresh_process(row: dict) -> dict:
    """`measure(row)` in a new Python process, so that its peak resident set is this row's alone."""
    launcher = [sys.executable]
    if row.get("ranks", 1) > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(row["ranks"])]
    command = [*launcher, __file__, "--row", json.dumps(row)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"row {row} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> list[str]:
    """The Markdown table of the rows, each total also as a ratio to AdamW's at the same shape, batch and precision."""

    def group(row: dict) -> tuple:
        return row["shape"], row["batch"], row["precision"], row.get("ranks", 1)

    adamw = {group(row): row for row in rows if row["method"] == "adamw"}
    lines = [
        "| shape | batch | precision | method | params+buffers MiB | grads MiB | optimizer MiB | saved MiB | total MiB "
        "| × AdamW | peak allocated MiB (× AdamW) | peak RSS MiB (growth) | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        total = sum(row[k] for k in KINDS)
        reference = adamw.get(group(row))
        ratio = f"{total / sum(reference[k] for k in KINDS):.2f}" if reference else "–"
        allocated = row.get("allocated_mib")  # rows measured before this column have none
        if allocated is None:
            allocated_cell = "–"
        elif reference and reference.get("allocated_mib"):
            allocated_cell = f"{allocated:.0f} ({allocated / reference['allocated_mib']:.2f})"
        else:
            allocated_cell = f"{allocated:.0f}"
        cells = " | ".join(f"{row[kind] / MIB:.0f}" for kind in KINDS)
        step = f"{row['step_s']:.2f}" if row["step_s"] is not None else "–"
        sharding = f", rank 0 of {row['ranks']} (FSDP2)" if row.get("ranks", 1) > 1 else ""
        lines.append(
            f"| {row['shape']}{sharding} | {row['batch']} | {row['precision']} | `{row['method']}` | {cells} "
            f"| {total / MIB:.0f} "
            f"| {ratio} | {allocated_cell} | {row['peak_mib']:.0f} ({row['growth_mib']:.0f}) | {step} |"
        )
    return lines


def main() -> None:
    """Measure every row asked for that --results does not hold yet, then print the table of all of them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["60m"], choices=SHAPES)
    parser.add_argument("--batches", nargs="+", default=["4x256", "1x1024"], help="batch×sequence length")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="run_clm.py --method and its flags, quoted")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the two warm-up steps (0: no timing)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("memory_runs.jsonl"))
    parser.add_argument("--record", type=Path, help="append the result table to this Markdown file")
    parser.add_argument(
        "--ranks", type=int, default=1, help="processes sharing each row under FSDP2 (per-rank figures)"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = parser.parse_args()
    if args.row:
        measured = measure(json.loads(args.row))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(measured))
        return
    wanted = [
        {"shape": s, "batch": b, "precision": p, "method": m, "vocab": args.vocab, "device": args.device, "steps": n}
        | ({"ranks": args.ranks} if args.ranks > 1 else {})
        for s in args.shapes
        for b in args.batches
        for p in args.precisions
        for m in args.methods
        for n in [args.steps]
    ]
    done = {}
    if args.results.exists():
        done = {row_key(row): row for row in map(json.loads, args.results.read_text().splitlines()) if row}
    for row in tqdm([row for row in wanted if row_key(row) not in done], desc="bench_memory rows"):
        measured = run_in_fresh_process(row)
        done[row_key(row)] = measured
        with args.results.open("a") as results:
            results.write(json.dumps(measured) + "\n")
    rows = [done[row_key(row)] for row in wanted]
    machine = rows[0]["machine"] if rows else platform.machine()
    header = f"bench_memory, {date.today()}, {machine}, torch {torch.__version__}, vocab {args.vocab}"
    publish("\n".join([header, "", *table(rows)]), args.record)


if __name__ == "__main__":
    main()
