#!/usr/bin/env python
"""ORA against its ablation and baselines, at equal tokens on the bundled corpus, from one command.

Trains run_clm.py's LLaMA once per variant, same data order, same seed, same lr: vanilla (AdamW, everything
trained), ORA (random orthogonal Q/K, frozen), ORA with Gaussian Q/K (A1), ORA with trainable Q/K (A2), and
Synthesizer attention (random and factorized). It records each run's validation perplexity, trainable
parameters and loss curve. Step time is measured separately, side by side in this one process: the variants'
training steps (forward, backward, AdamW) alternate on the same batch, and each gets the median of its rounds.

    python benchmarks/bench_ora.py --steps 800 --record benchmarks/RESULTS.md --plot benchmarks/ora_loss.png

`--plot` needs matplotlib (`pip install -e '.[bench]'`).
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

import torch
from tqdm.auto import tqdm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import run_clm  # noqa: E402
from clm_runs import run_clm_process  # noqa: E402
from reporting import plot_loss_curves, publish  # noqa: E402

VARIANTS = {
    "vanilla": ["--method", "adamw"],
    "ora": ["--method", "ora"],
    "ora_gaussian": ["--method", "ora", "--ora_init", "gaussian"],
    "ora_trainable_qk": ["--method", "ora", "--ora_trainable_qk"],
    "synthesizer_random": ["--method", "adamw", "--attention", "synthesizer_random"],
    "synthesizer_factorized": ["--method", "adamw", "--attention", "synthesizer_factorized"],
}


def common_flags(args: argparse.Namespace) -> list[str]:
    """The run_clm.py flags every variant shares."""
    return [
        "--model_size", args.model_size,
        "--learning_rate", str(args.lr),
        "--block_size", str(args.block_size),
        "--per_device_train_batch_size", str(args.batch_size),
        "--seed", str(args.seed),
        *(["--max_eval_samples", str(args.eval_samples)] if args.eval_samples else []),
    ]  # fmt: skip


def train_variant(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Run run_clm.py for one variant in its own process; its summary, parameter counts and loss curve."""
    flags = [
        *common_flags(args), *VARIANTS[name],
        "--max_train_steps", str(args.steps), "--eval_steps", str(args.steps), "--logging_steps", "10",
    ]  # fmt: skip
    run = run_clm_process(name, flags, workdir / name)
    counts = next(line for line in run["stdout"].splitlines() if line.startswith("trainable parameters"))
    trainable, total = (int(part.replace(",", "")) for part in counts.split(":")[1].split("(")[0].split(" of "))
    curve = [(record["train/tokens"], record["train/loss"]) for record in run["records"] if "train/loss" in record]
    return {"summary": run["summary"], "trainable": trainable, "total": total, "curve": curve}


def step_seconds(args: argparse.Namespace, names: list[str]) -> dict[str, float]:
    """Median seconds per training step of each variant, measured in alternating rounds on one batch."""
    torch.manual_seed(args.seed)
    shared_args = run_clm.parse_args(common_flags(args))
    tokenizer = run_clm.load_tokenizer(shared_args, run_clm.load_raw_splits(shared_args)[0])
    batch = torch.randint(len(tokenizer), (args.batch_size, args.block_size))
    runs = {}
    for name in names:
        clm_args = run_clm.parse_args([*common_flags(args), *VARIANTS[name]])
        method = run_clm.METHODS[clm_args.method]
        model = method.wrap(run_clm.build_model(clm_args, tokenizer), clm_args).train()
        optimizer = torch.optim.AdamW(method.param_groups(model, clm_args), eps=1e-6)
        runs[name] = (model, optimizer)
    times = {name: [] for name in names}
    for _ in tqdm(range(args.timing_rounds + 1), desc="timing steps (alternating)"):
        for name, (model, optimizer) in runs.items():
            start = time.perf_counter()
            for _ in range(args.timing_steps):
                model(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            times[name].append((time.perf_counter() - start) / args.timing_steps)
    return {name: statistics.median(values[1:]) for name, values in times.items()}  # round 0 warms up


def main() -> None:
    """Train every variant, time their steps side by side, print (and optionally record) the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--model_size", choices=list(run_clm.MODEL_SIZES), default="tiny", help="as in run_clm.py")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per variant (equal tokens)")
    parser.add_argument("--lr", type=float, default=1e-3, help="one lr for every variant")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_samples", type=int, help="validation sequences (default: the whole split)")
    parser.add_argument("--timing_rounds", type=int, default=10)
    parser.add_argument("--timing_steps", type=int, default=5, help="steps per variant per timing round")
    parser.add_argument("--record", type=Path, help="append the result table to this Markdown file")
    parser.add_argument("--plot", type=Path, help="draw the loss curves to this PNG")
    args = parser.parse_args()
    if "vanilla" not in args.variants:
        parser.error("--variants must include vanilla: every ratio is against it")

    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        results = {name: train_variant(name, args, Path(workdir)) for name in tqdm(args.variants, desc="training")}
    seconds = step_seconds(args, args.variants)
    vanilla_ppl = results["vanilla"]["summary"]["eval/perplexity"]
    tokens = results["vanilla"]["summary"]["tokens"]
    lines = [
        f"ORA benchmark, {date.today()}, {platform.processor() or platform.machine()} CPU, torch {torch.__version__}, "
        f"{time.time() - started:.0f} s",
        f"`python benchmarks/bench_ora.py --steps {args.steps} --lr {args.lr} --model_size {args.model_size}` "
        f"({args.steps} steps × {args.batch_size} × {args.block_size} = {tokens:,} tokens per variant, seed "
        f"{args.seed}, fp32)",
        "",
        "| variant | validation ppl | gap to vanilla | step time (ms) | step time / vanilla | trainable params |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        ppl = result["summary"]["eval/perplexity"]
        lines.append(
            f"| {name} | {ppl:.2f} | {100 * (ppl / vanilla_ppl - 1):+.1f}% | {1000 * seconds[name]:.1f} "
            f"| {seconds[name] / seconds['vanilla']:.3f} | {result['trainable']:,} of {result['total']:,} |"
        )
    publish("\n".join(lines), args.record)
    if args.plot:
        curves = {name: result["curve"] for name, result in results.items()}
        plot_loss_curves(curves, args.plot, "ORA vs vanilla, Gaussian-frozen and Synthesizer attention", top=7.5)


if __name__ == "__main__":
    main()
