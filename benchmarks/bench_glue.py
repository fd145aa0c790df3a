#!/usr/bin/env python
"""run_glue.py's offline demo (all-MiniLM-L6-v2 on Rotten Tomatoes sentences) for each method, from one command.

Each method runs in its own process with the script's defaults (3,000 training sentences, 2 epochs, batch 32, the
method's default lr; POET and OFT at block 64, LoRA r=8 on PEFT's default targets) one after another on this machine,
and the table gives the best epoch's validation accuracy, F1 and MCC, the trainable parameters and the training time.
`--learning_rates` sweeps multipliers of each method's default lr (for POET the head's; its Q keeps --poet_lr) and
reports each method at its best.

    python benchmarks/bench_glue.py --record benchmarks/RESULTS.md
    python benchmarks/bench_glue.py --methods lora,poet --learning_rates 0.5,1,2
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
from reporting import publish

RUN_GLUE = Path(__file__).resolve().parents[1] / "examples" / "run_glue.py"
sys.path.insert(0, str(RUN_GLUE.parent))
import run_glue  # noqa: E402

METHODS = ["full", "lora", "oft", "poet", "spectral_lora"]
DEFAULT_METHODS = "full,lora,oft,poet"


def run_method(method: str, lr: float, flags: list[str], output_dir: Path) -> dict:
    """One run_glue.py run in a fresh process; its results.json."""
    command = [sys.executable, str(RUN_GLUE), "--method", method, "--learning_rate", str(lr), *flags]
    result = subprocess.run([*command, "--output_dir", str(output_dir)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{method} at lr {lr:g} failed:\n{result.stderr[-3000:]}")
    return json.loads((output_dir / "results.json").read_text())


def report(results: dict[str, dict], args: argparse.Namespace, swept: bool) -> str:
    """The Markdown table, with the machine, date and command."""
    rows = [
        "| method | lr | accuracy | F1 | MCC | trainable params | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, result in results.items():
        best = result["best"]
        lr = f"{result['learning_rate']:g}" + (f" (Q: {result['poet_lr']:g})" if "poet_lr" in result else "")
        rows.append(
            f"| {method} | {lr} | {best['eval/accuracy']:.4f} | {best['eval/f1']:.4f} | "
            f"{best['eval/matthews_correlation']:.4f} | {result['trainable_parameters']:,} | "
            f"{result['train_seconds']:.0f} |"
        )
    threads = torch.get_num_threads()
    sweep = f", each at the best of lr × {args.learning_rates}" if swept else ", each at its default lr"
    header = (
        f"### GLUE demo: all-MiniLM-L6-v2 on Rotten Tomatoes ({date.today()}, {platform.machine()}, "
        f"{threads} threads, torch {torch.__version__})\n\n"
        f"`{' '.join(['python benchmarks/bench_glue.py', *sys.argv[1:]])}`: 3,000 training sentences, 1,000 validation "
        f"sentences, {args.epochs} epochs, seed {args.seed}{sweep}; the best epoch's validation metrics.\n"
    )
    return header + "\n" + "\n".join(rows)


def main() -> None:
    """Run every method (and lr) and publish the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--learning_rates", default="1", help="comma-separated multipliers of each default lr")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_train_steps", type=int, help="cut each run short (a quick check, not a result)")
    parser.add_argument("--max_eval_samples", type=int, help="validate on fewer sentences (a quick check)")
    parser.add_argument("--record", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    multipliers = [float(value) for value in args.learning_rates.split(",")]
    flags = ["--num_train_epochs", str(args.epochs), "--seed", str(args.seed)]
    for name in ("max_train_steps", "max_eval_samples"):
        if getattr(args, name):
            flags += [f"--{name}", str(getattr(args, name))]
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for method in methods:
            for multiplier in multipliers:
                lr = run_glue.LEARNING_RATES[method] * multiplier
                result = run_method(method, lr, flags, Path(workdir) / f"{method}-{lr:g}")
                print(f"{method} lr {lr:g}: {json.dumps(result['best'])}", flush=True)
                best = results.get(method)
                if best is None or result["best"]["eval/accuracy"] > best["best"]["eval/accuracy"]:
                    results[method] = result
    publish(report(results, args, len(multipliers) > 1), args.record)


if __name__ == "__main__":
    main()
