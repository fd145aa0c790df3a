#!/usr/bin/env python
"""The spectral monitor's cost, and AdamW's spectrum next to POET's, from real runs of examples/run_clm.py.

Trains run_clm.py's tiny LLaMA on the bundled text once per method with `--spec-monitor`. The overhead is measured
inside each run, so no second run's noise enters it: the seconds the monitor's measurements took during training
(its `spec/seconds`, the step-0 one excluded) over the run's training seconds, which include them. `--plot_dir`
writes `poet-peft plot`'s PNGs of all runs side by side.

    python benchmarks/bench_monitor.py --steps 1000 --record benchmarks/RESULTS.md --plot_dir benchmarks/monitor
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from clm_runs import run_clm_process
from reporting import publish
from tqdm.auto import tqdm

from poet_peft.plots import SpectralSeries, plot_runs

METHODS = {"adamw": ["--method", "adamw", "--learning_rate", "3e-3"], "poet": ["--method", "poet"]}


def train(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One monitored run_clm.py run in its own process: its summary, monitor seconds and spectral series."""
    flags = [
        *METHODS[name],
        "--model_size", args.model_size, "--max_train_steps", str(args.steps), "--eval_steps", str(args.steps),
        "--logging_steps", "50", "--seed", str(args.seed),
        "--spec-monitor", "--spec-every", str(args.every), "--spec-topk", str(args.topk),
        *(["--max_eval_samples", str(args.eval_samples)] if args.eval_samples else []),
    ]  # fmt: skip
    run = run_clm_process(name, flags, workdir / name)
    measured = [record for record in run["records"] if "spec/seconds" in record and record["step"] > 0]
    return {
        "summary": run["summary"],
        "measurements": len(measured),
        "monitor_seconds": sum(record["spec/seconds"] for record in measured),
        "train_seconds": run["summary"]["tokens"] / run["summary"]["train/tokens_per_second"],
        "series": SpectralSeries(run["records"]),
    }


def report(results: dict, args: argparse.Namespace, elapsed: float) -> str:
    """The Markdown section: machine, command, the overhead table and what each run's spectrum did."""
    lines = [
        f"## Spectral monitor overhead ({date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"`python benchmarks/bench_monitor.py --steps {args.steps} --every {args.every} --topk {args.topk} "
        f"--model_size {args.model_size}` ({elapsed:.0f} s). Overhead = the monitor's seconds during training over "
        "the run's training seconds (which include them), in the same run.",
        "",
        "| method | monitored matrices | measurements | monitor s | training s | overhead | final val ppl |"
        " mean spectrum drift at the end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        series = result["series"]
        drifts = [series.series(module, "spectrum_drift")[1][-1] for module in series.modules]
        lines.append(
            f"| {name} | {len(series.modules)} | {result['measurements']} | {result['monitor_seconds']:.2f} | "
            f"{result['train_seconds']:.1f} | {100 * result['monitor_seconds'] / result['train_seconds']:.2f}% | "
            f"{result['summary']['eval/perplexity']:.2f} | {sum(drifts) / len(drifts):.2e} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run each method with the monitor on, print (and optionally record) the overhead table, draw the plots."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--model_size", default="tiny", help="run_clm.py's --model_size")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    parser.add_argument("--every", type=int, default=100, help="--spec-every")
    parser.add_argument("--topk", type=int, default=8, help="--spec-topk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_samples", type=int, help="validation sequences (default: the whole split)")
    parser.add_argument("--record", type=Path, help="append the result table to this Markdown file")
    parser.add_argument("--plot_dir", type=Path, help="write poet-peft plot's PNGs of all runs here")
    args = parser.parse_args()

    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        results = {name: train(name, args, Path(workdir)) for name in tqdm(args.methods, desc="monitored runs")}
        publish(report(results, args, time.time() - started), args.record)
        if args.plot_dir:
            runs = {name: result["series"] for name, result in results.items()}
            for path in plot_runs(runs, args.plot_dir):
                print(path)


if __name__ == "__main__":
    main()
