#!/usr/bin/env python
"""Seed 002's E4 against its controls B0–B3 on the bundled corpus: time-to-X and final validation perplexity.

Each variant trains run_clm.py's LLaMA from scratch at equal tokens, for every seed:
- b0: plain AdamW;
- e4: after the warm-up, every block linear split into W = R + U·C·Vᵀ along its top-k singular directions, C at
  lr × ratio, R's gradient projected off the U–V block;
- b1: after the warm-up, the block linears' whole lr × ratio, no split;
- b2: the E4 split along random orthonormal U, V;
- b3: spectral-clamped LoRA only (frozen random backbone; embeddings, norms and head trained), its clamp timed;
- 3b: plain AdamW with the momentum's top-k subspace tracked every 50 steps and the lr inside it × ratio.

X is a validation perplexity that plain AdamW reaches: by default b0's mean perplexity at 70% of training.
Time-to-X is the first evaluation step at which a run's perplexity is ≤ X, in steps and in training seconds.

    python benchmarks/bench_e4.py --seeds 0 1 2 --record benchmarks/RESULTS.md --plot benchmarks/e4_curves.png
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import run_clm  # noqa: E402
from clm_runs import run_clm_process  # noqa: E402
from reporting import publish  # noqa: E402


def variant_flags(name: str, args: argparse.Namespace) -> list[str]:
    """run_clm.py flags of one variant."""
    e4 = ["--e4_warmup_steps", str(args.warmup), "--e4_rank", str(args.rank), "--e4_lr_ratio", str(args.ratio)]
    return {
        "b0": ["--method", "adamw"],
        "e4": ["--method", "adamw", "--e4", "svd", *e4],
        "b1": ["--method", "adamw", "--e4", "global", *e4],
        "b2": ["--method", "adamw", "--e4", "random", *e4],
        "b3": ["--method", "spectral_lora", "--lora_r", str(args.rank), "--magnitude_lr_ratio", str(args.ratio)],
        "3b": [
            "--method", "adamw", "--track_directions_every", "50", "--track_topk", str(args.rank),
            "--track_amplify", str(args.ratio),
        ],
    }[name]  # fmt: skip


VARIANTS = ("b0", "e4", "b1", "b2", "b3", "3b")


def train_variant(name: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict:
    """Run run_clm.py for one variant and seed in its own process; its evaluations and training seconds."""
    flags = [
        *variant_flags(name, args),
        "--model_size", args.model_size, "--learning_rate", str(args.lr), "--seed", str(seed),
        "--block_size", str(args.block_size), "--per_device_train_batch_size", str(args.batch_size),
        "--max_train_steps", str(args.steps), "--eval_steps", str(args.eval_every), "--logging_steps", "5",
        "--max_eval_samples", str(args.eval_sequences),
    ]  # fmt: skip
    records = run_clm_process(f"{name} (seed {seed})", flags, workdir / f"{name}-{seed}")["records"]
    seconds, elapsed, previous_step, evals, clamp_ms, step_ms, stable = 0.0, {}, 0, [], [], [], []
    for record in records:
        if "train/tokens_per_second" in record:
            window = record["step"] - previous_step
            step_seconds = record["train/tokens"] / record["step"] / record["train/tokens_per_second"]
            seconds += window * step_seconds
            previous_step = record["step"]
            step_ms.append(1000 * step_seconds)
            clamp_ms += [record["train/clamp_ms"]] if "train/clamp_ms" in record else []
        elapsed[record["step"]] = seconds
        if "eval/perplexity" in record:
            evals.append((record["step"], record["eval/perplexity"]))
        if "stable/p" in record:
            stable.append({key: value for key, value in record.items() if key.count("/") == 1})
    return {"evals": evals, "seconds": elapsed, "clamp_ms": clamp_ms, "step_ms": step_ms, "stable": stable}


def time_to(run: dict, target: float) -> tuple[Optional[int], Optional[float]]:
    """First evaluation step with perplexity ≤ target, and the training seconds up to it (None, None if never)."""
    for step, perplexity in run["evals"]:
        if perplexity <= target:
            return step, run["seconds"][step]
    return None, None


def mean_std(values: list[float]) -> str:
    """'mean ± std' (or 'mean' for one value, '—' for none)."""
    values = [value for value in values if value is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def plot(runs: dict, target: float, path: Path) -> None:
    """Validation perplexity against steps, mean over seeds, one curve per variant, with X drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for name, seeds in runs.items():
        steps = [step for step, _ in seeds[0]["evals"]]
        means = [statistics.mean(run["evals"][i][1] for run in seeds) for i in range(len(steps))]
        axis.plot(steps, means, label=name, lw=1.3)
    axis.axhline(target, color="gray", ls="--", lw=0.8, label=f"X = {target:.1f}")
    axis.set(xlabel="optimizer step", ylabel="validation perplexity (mean over seeds)", yscale="log")
    axis.set_ylim(top=min(axis.get_ylim()[1], 4 * target))
    axis.set_title("E4 vs B0–B3 (seed 002)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    """Train every variant for every seed, then print (and optionally record) time-to-X and final perplexity."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--model_size", choices=list(run_clm.MODEL_SIZES), default="nano", help="as in run_clm.py")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (equal tokens)")
    parser.add_argument("--lr", type=float, default=3e-3, help="base lr of every variant")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=100, help="steps before the E4/B1/B2 switch")
    parser.add_argument("--rank", type=int, default=8, help="k of the split, r of B3's LoRA and of 3B's subspace")
    parser.add_argument("--ratio", type=float, default=5.0, help="lr ratio (C, B1, magnitudes) and 3B's α")
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--eval_sequences", type=int, default=64, help="validation sequences per evaluation")
    parser.add_argument("--target", type=float, help="X; default: b0's mean perplexity at 70%% of the steps")
    parser.add_argument("--record", type=Path, help="append the result table to this Markdown file")
    parser.add_argument("--plot", type=Path, help="draw the validation curves to this PNG")
    args = parser.parse_args()
    if "b0" not in args.variants:
        parser.error("--variants must include b0: X and every comparison are against it")

    started = time.time()
    jobs = [(name, seed) for name in args.variants for seed in args.seeds]
    runs = {name: [] for name in args.variants}
    with tempfile.TemporaryDirectory() as workdir:
        for name, seed in tqdm(jobs, desc="training runs"):
            runs[name].append(train_variant(name, seed, args, Path(workdir)))
    checkpoint = round(0.7 * args.steps / args.eval_every) * args.eval_every
    target = args.target or statistics.mean(dict(run["evals"])[checkpoint] for run in runs["b0"])
    baseline_reached = [time_to(run, target)[0] for run in runs["b0"]]
    baseline_steps = statistics.mean(step for step in baseline_reached if step is not None)  # X is b0's: some reach it
    baseline_final = statistics.mean(run["evals"][-1][1] for run in runs["b0"])

    command = (
        f"python benchmarks/bench_e4.py --seeds {' '.join(map(str, args.seeds))} --model_size {args.model_size} "
        f"--steps {args.steps} --lr {args.lr} --warmup {args.warmup} --rank {args.rank} --ratio {args.ratio}"
    )
    lines = [
        f"E4 benchmark, {date.today()}, {platform.processor() or platform.machine()} CPU, torch {torch.__version__}, "
        f"{time.time() - started:.0f} s",
        f"`{command}` ({len(args.seeds)} seeds; validation on {args.eval_sequences} sequences every "
        f"{args.eval_every} steps; X = {target:.2f})",
        "",
        "| variant | reached X | time-to-X (steps) | vs b0 | time-to-X (s) | final val ppl | vs b0 | step ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, seeds in runs.items():
        reached = [time_to(run, target) for run in seeds]
        steps = [step for step, _ in reached if step is not None]
        finals = [run["evals"][-1][1] for run in seeds]
        speedup = f"{100 * (1 - statistics.mean(steps) / baseline_steps):+.1f}% faster" if steps else "—"
        step_ms = statistics.mean(statistics.median(run["step_ms"]) for run in seeds)
        lines.append(
            f"| {name} | {len(steps)}/{len(seeds)} | {mean_std(steps)} | {speedup} | "
            f"{mean_std([seconds for _, seconds in reached])} | {mean_std(finals)} | "
            f"{100 * (statistics.mean(finals) / baseline_final - 1):+.1f}% | {step_ms:.0f} |"
        )
    if "b3" in runs:
        clamp = statistics.mean(ms for run in runs["b3"] for ms in run["clamp_ms"])
        step = statistics.mean(statistics.median(run["step_ms"]) for run in runs["b3"])
        lines += [
            "",
            f"Spectral clamp (b3): {clamp:.2f} ms per step, {100 * clamp / step:.1f}% of its {step:.0f} ms step.",
        ]
    if "3b" in runs:
        last = [run["stable"][-1] for run in runs["3b"] if run["stable"]]
        if last:
            keys = [
                key for key in ("stable/p", "stable/p_prev", "stable/cos_u_mean", "stable/cos_v_mean") if key in last[0]
            ]
            lines += [
                "",
                "Stable directions (3b, last measurement, mean over modules and seeds): "
                + ", ".join(
                    f"{key.partition('/')[2]} = {statistics.mean(entry[key] for entry in last):.3f}" for key in keys
                ),
            ]
    publish("\n".join(lines), args.record)
    if args.plot:
        plot(runs, target, args.plot)


if __name__ == "__main__":
    main()
