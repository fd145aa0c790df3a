#!/usr/bin/env python
"""Spectral drift over hundreds of merges, and the loss jump each merge costs, with and without orthogonalisation.

POET promises that W keeps W0's singular values. With Cayley–Neumann, R is only nearly orthogonal, so folding it
into W0 at every merge can move them. This trains the same tiny LLaMA on the bundled text twice, side by side in
one process and from the same seed: once folding R and P as trained (merge_orthogonalize=False) and once folding
their closest orthogonal matrices (merge_orthogonalize=True). At every merge it records the largest relative
change of any singular value of any POET weight against its W0 (three ways: against σ_max, against each σᵢ of at
least 1% of σ_max, and against every σᵢ), the largest ‖Q‖₂ of any block, and the held-out loss right before and
right after the merge.

    python benchmarks/bench_merge_spectrum.py --merges 500 --merge_every 5 --plot benchmarks/merge_spectrum.png

`--plot` needs matplotlib (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from peft import get_peft_model
from tqdm.auto import tqdm

import poet_peft
from poet_peft.ops.orthogonal import packed_size, skew_from_packed
from poet_peft.ops.spectral import singular_value_drift

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import run_clm  # noqa: E402
from reporting import publish  # noqa: E402


def singular_values(model) -> list[torch.Tensor]:
    """The singular values of every POET layer's W0, in float64."""
    return [torch.linalg.svdvals(layer.logical_weight().double()) for layer in poet_peft.poet_layers(model)]


def largest_skew_norm(model) -> float:
    """The largest spectral norm of any skew block Q about to be folded."""
    norms = []
    for layer in poet_peft.poet_layers(model):
        for name, (out_layout, in_layout) in layer.poet_layouts.items():
            for packed, layout in ((layer.poet_R[name], out_layout), (layer.poet_P[name], in_layout)):
                start = 0
                for count, size in layout.groups:
                    stop = start + count * packed_size(size)
                    blocks = skew_from_packed(packed.detach()[start:stop].view(count, -1), size)
                    norms.append(torch.linalg.matrix_norm(blocks.double(), ord=2).max())
                    start = stop
    return max(norms).item()


def run(orthogonalize: bool, data: torch.Tensor, held_out: torch.Tensor, clm_args, tokenizer, args) -> dict:
    """Train with merges and return the drift and loss-jump record."""
    torch.manual_seed(args.seed)
    config = poet_peft.POETConfig(
        block=args.block,
        merge_every=args.merge_every,
        merge_orthogonalize=orthogonalize,
        init_weights="normalized_gaussian",
        train_in_place=run_clm.TRAINED_IN_FULL,
        seed=args.seed,
    )
    model = get_peft_model(run_clm.build_model(clm_args, tokenizer), config)
    optimizer = torch.optim.AdamW(poet_peft.create_param_groups(model, args.lr, 0.01, poet_lr=args.poet_lr), eps=1e-6)
    initial = singular_values(model)
    generator = torch.Generator().manual_seed(args.seed)
    drift, jumps, skew_norms = [], [], []
    label = "orthogonalised" if orthogonalize else "as trained"
    for step in tqdm(range(1, args.merges * args.merge_every + 1), desc=f"fold {label}", mininterval=2):
        batch = data[torch.randint(len(data), (args.batch_size,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.merge_every == 0:
            with torch.no_grad():
                before = model(input_ids=held_out, labels=held_out).loss.item()
                skew_norms.append(largest_skew_norm(model))
                poet_peft.merge_and_reinit(model, optimizer)
                after = model(input_ids=held_out, labels=held_out).loss.item()
            jumps.append(abs(after - before) / before)
            current = singular_values(model)
            drift.append(
                [max(singular_value_drift(s0, s, floor) for s0, s in zip(initial, current)) for floor in (1, 0.01, 0)]
            )
    return {"drift": drift, "jumps": jumps, "skew_norms": skew_norms, "final_loss": after}


def plot(results: dict, path: Path) -> None:
    """Spectral drift and loss jump per merge, both folds, on log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (drift_axis, jump_axis) = plt.subplots(1, 2, figsize=(11, 5.2))
    for mode, label, color in ((False, "folded as trained", "tab:red"), (True, "orthogonalised", "tab:blue")):
        merges = range(1, len(results[mode]["drift"]) + 1)
        drift = torch.tensor(results[mode]["drift"])
        for column, style, against in ((0, "-", "σ_max"), (1, "--", "each σᵢ ≥ 1% σ_max"), (2, ":", "every σᵢ")):
            drift_axis.plot(merges, drift[:, column], color=color, linestyle=style, label=f"{label}: vs {against}")
        jump_axis.plot(merges, torch.tensor(results[mode]["jumps"]).clamp_min(1e-9), color=color, label=label, lw=0.8)
    drift_axis.axhline(1e-4, color="gray", lw=0.6, label="1e-4")
    drift_axis.set(yscale="log", xlabel="merges", ylabel="largest relative change of a singular value")
    jump_axis.set(yscale="log", xlabel="merges", ylabel="relative held-out loss jump at the merge")
    drift_axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    jump_axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    figure.suptitle("POET merge-then-reinitialize: spectrum kept vs function kept")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    """Run both merge modes and print (and optionally record) the comparison."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merges", type=int, default=500)
    parser.add_argument("--merge_every", type=int, default=5)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--model_size", choices=list(run_clm.MODEL_SIZES), default="nano", help="as in run_clm.py")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--poet_lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", type=Path, default=None, help="append the result table to this Markdown file")
    parser.add_argument("--plot", type=Path, default=None, help="draw drift and loss jumps per merge to this PNG")
    args = parser.parse_args()

    # The bundled Wikipedia summaries and the BPE tokenizer of examples/run_clm.py.
    clm_args = run_clm.parse_args(
        ["--model_size", args.model_size, "--vocab_size", "1024", "--block_size", str(args.block_size)]
    )
    train, validation = run_clm.load_raw_splits(clm_args)
    tokenizer = run_clm.load_tokenizer(clm_args, train)
    data = torch.tensor(run_clm.tokenize_and_pack(train, tokenizer, clm_args, "the training split")["input_ids"])
    held_out = torch.tensor(run_clm.tokenize_and_pack(validation, tokenizer, clm_args, "held-out text")["input_ids"])

    started = time.time()
    results = {mode: run(mode, data, held_out[:16], clm_args, tokenizer, args) for mode in (False, True)}
    checkpoints = sorted({1, 10, 50, 100, 200, 300, 400, 500, args.merges} & set(range(1, args.merges + 1)))
    lines = [
        f"Merge spectrum benchmark, {date.today()}, {platform.processor() or platform.machine()} CPU, "
        f"torch {torch.__version__}, {time.time() - started:.0f} s",
        f"`python benchmarks/bench_merge_spectrum.py --merges {args.merges} --merge_every {args.merge_every} "
        f"--block {args.block} --poet_lr {args.poet_lr}` (run_clm.py's {args.model_size} LLaMA, fp32)",
        "",
        "Largest change of any singular value of any POET weight against W0's: relative to σ_max / to each σᵢ ≥ "
        "1% of σ_max / to every σᵢ.",
        "",
        "| merges | folded as trained | orthogonalised: vs σ_max | vs σᵢ ≥ 1% σ_max | vs every σᵢ "
        "| median ‖Q‖₂ at merge |",
        "|---|---|---|---|---|---|",
    ]
    for k in checkpoints:
        norms = torch.tensor(results[False]["skew_norms"][:k])
        trained, orthogonal = results[False]["drift"][k - 1], results[True]["drift"][k - 1]
        lines.append(
            f"| {k} | {trained[0]:.2e} / {trained[1]:.2e} / {trained[2]:.2e} | {orthogonal[0]:.2e} "
            f"| {orthogonal[1]:.2e} | {orthogonal[2]:.2e} | {norms.median().item():.3f} |"
        )
    lines += [
        "",
        "| fold | median rel. loss jump per merge | max rel. loss jump | held-out loss at the end |",
        "|---|---|---|---|",
    ]
    for mode, label in ((False, "as trained"), (True, "orthogonalised")):
        jumps = torch.tensor(results[mode]["jumps"])
        lines.append(
            f"| {label} | {jumps.median().item():.2e} | {jumps.max().item():.2e} | {results[mode]['final_loss']:.4f} |"
        )
    publish("\n".join(lines), args.record)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
