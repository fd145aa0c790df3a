#!/usr/bin/env python
"""POET against tuned AdamW, Muon, GaLore and LoRA: pretraining a block-dominated LLaMA at equal tokens.

The model is run_clm.py's `tiny` LLaMA (hidden 128, FFN 352, 4 layers, untied) with a 1,024-token byte-level BPE,
so that the transformer-block linears hold 75% of the parameters (the nano setting this replaced was 90%
embeddings). Every run trains on the bundled Wikipedia text, same data order, same token budget, in its own
process (examples/run_clm.py), and is scored by validation perplexity. Methods:
- adamw (everything trained), muon (torch.optim.Muon on the block matrices, AdamW on the rest, one lr), galore
  (galore-torch, rank hidden/4), lora (r = hidden/4 on the frozen random init, the rest trained);
- adamw and muon with POET's split of lrs ("block-lr"): the block matrices at the swept lr (run_clm's
  --block_lr), embeddings, norms and lm_head at the base lr of 1e-2;
- poet-bs at b = hidden/2 and hidden/8, poet-fs at b = 1/2 (normalized-Gaussian W0), and poet-bs b = hidden/2
  with `--recipe official` (the official code's clip 0.1, no decay or warmup, its AdamW). POET's swept lr is its
  Q's; the rest of the model trains at the recipe's base lr (the paper's 1e-2).

Each method's lr is swept on a grid centre × 2^k (k = --lr_steps, then further out) until its best lr is interior
(both neighbours worse; a diverged run counts as worse) or --max_lr_points is reached; then --seeds seeds run at
the best lr. With --ablations, POET-BS b=hidden/2 at its best lr also runs the paper's ablations (W0 init, merge
interval T_m, Neumann terms k; Tables 5-7) for --ablation_seeds seeds, against its own best runs as the base.

Every finished run is appended to --results as a JSON line and a rerun skips the runs already there, so the sweep
spans sessions: stop it any time (a killed run is simply redone). The report (tables and loss curves) is built
from the results file alone; --max_runs 0 only reports.

    python benchmarks/bench_pretrain.py --ablations all --record benchmarks/RESULTS.md \\
        --plot benchmarks/pretrain_loss.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Optional

import torch
from clm_runs import run_clm_process
from reporting import plot_loss_curves, publish
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from run_clm import MODEL_SIZES  # noqa: E402

BASE = "poet-bs b=h/2"  # the method the ablations vary
# A run's tokens/s count only if the machine's 1-minute load at its end was at most this (one run_clm process on
# two cores keeps it near 2): another job beside it slows it by an unknown factor.
QUIET_LOAD = 3.0


@dataclass(frozen=True)
class Method:
    """How run_clm.py trains a method, and where its lr sweep is centred."""

    flags: tuple[str, ...]
    centre: float
    lr_flag: str = "--learning_rate"  # the lr the sweep moves


def methods(hidden: int) -> dict[str, Method]:
    """The methods of this benchmark at a model of width `hidden`.

    Sweep centres: POET's Q at the paper's lr for its block (1e-3·256/b, 1e-3 at f = 1/2; the official recipe's
    2e-3), the others where first runs on this model put them.
    """
    half, eighth, quarter = str(hidden // 2), str(hidden // 8), str(hidden // 4)
    return {
        "adamw": Method(("--method", "adamw"), 4e-3),
        "muon": Method(("--method", "muon"), 4e-3),
        "galore": Method(("--method", "galore"), 8e-3),
        "lora r=h/4": Method(("--method", "lora", "--lora_r", quarter, "--lora_alpha", quarter), 8e-3),
        # As POET trains: the block matrices at the swept lr, everything else at the paper's base lr of 1e-2.
        "adamw block-lr": Method(("--method", "adamw", "--learning_rate", "1e-2"), 2e-3, "--block_lr"),
        "muon block-lr": Method(("--method", "muon", "--learning_rate", "1e-2"), 4e-3, "--block_lr"),
        BASE: Method(("--method", "poet", "--block", half), 1e-3 * 256 / (hidden // 2), "--poet_lr"),
        "poet-bs b=h/8": Method(("--method", "poet", "--block", eighth), 1e-3 * 256 / (hidden // 8), "--poet_lr"),
        "poet-fs b=1/2": Method(("--method", "poet", "--mode", "fs", "--block", "0.5"), 1e-3, "--poet_lr"),
        "poet-bs b=h/2 official": Method(
            ("--method", "poet", "--recipe", "official", "--block", half), 2e-3, "--poet_lr"
        ),
    }


METHOD_NAMES = list(methods(128))

# The paper's ablations of POET (Tables 5-7), as flags added to the base method; the base itself is W0 normalized
# Gaussian, T_m 200 and k = 3.
ABLATIONS = {
    "init=standard": ("--init_weights", "standard"),
    "init=xavier": ("--init_weights", "xavier"),
    "init=uniform_spectrum": ("--init_weights", "uniform_spectrum"),
    "T_m=5": ("--merge_every", "5"),
    "T_m=25": ("--merge_every", "25"),
    "T_m=75": ("--merge_every", "75"),
    "T_m=never": ("--merge_every", "1000000"),
    "k=0": ("--neumann_terms", "0"),
    "k=1": ("--neumann_terms", "1"),
    "k=2": ("--neumann_terms", "2"),
    "k=4": ("--neumann_terms", "4"),
    "k=exact": ("--neumann_terms", "exact"),
}
ABLATION_GROUPS = {
    "W0 init (Table 5)": ["init=standard", "init=xavier", "init=uniform_spectrum"],
    "merge interval T_m (Table 6)": ["T_m=5", "T_m=25", "T_m=75", "T_m=never"],
    "Neumann terms k (Table 7)": ["k=0", "k=1", "k=2", "k=4", "k=exact"],
}


@dataclass(frozen=True)
class Run:
    """One training run: a method (with an ablation's flags, or none) at an lr grid point and a seed."""

    method: str
    exponent: int  # lr = centre × lr_step^exponent
    seed: int
    ablation: str = ""


def setting(args: argparse.Namespace) -> dict:
    """What every run of one benchmark shares; runs in the results file with another setting are not reused."""
    keys = ("model_size", "vocab_size", "steps", "batch_size", "block_size", "eval_samples", "lr_step", "warmup_steps")
    return {key: getattr(args, key) for key in keys}


def learning_rate(run: Run, args: argparse.Namespace) -> float:
    """The lr of a run: its method's centre × lr_step^exponent."""
    return methods(MODEL_SIZES[args.model_size]["hidden_size"])[run.method].centre * args.lr_step**run.exponent


def train(run: Run, args: argparse.Namespace, workdir: Path) -> dict:
    """One run_clm.py run; its perplexity, tokens/s, peak RSS, parameters and loss curve, as a results record."""
    method = methods(MODEL_SIZES[args.model_size]["hidden_size"])[run.method]
    lr = learning_rate(run, args)
    flags = [
        "--model_size", args.model_size, "--vocab_size", str(args.vocab_size), *method.flags,
        method.lr_flag, f"{lr:.6g}", *ABLATIONS.get(run.ablation, ()),
        "--block_size", str(args.block_size), "--per_device_train_batch_size", str(args.batch_size),
        "--max_train_steps", str(args.steps), "--eval_steps", str(args.steps), "--logging_steps", "10",
        "--max_eval_samples", str(args.eval_samples), "--num_warmup_steps", str(args.warmup_steps),
        "--seed", str(run.seed),
    ]  # fmt: skip
    record = {**run.__dict__, "lr": lr, "setting": setting(args), "flags": flags}
    label = f"{run.method} {run.ablation} lr {lr:.3g} seed {run.seed}".replace("  ", " ")
    started = time.time()
    try:
        result = run_clm_process(label, flags, workdir / re.sub(r"[^\w.=-]+", "_", label))
    except RuntimeError as error:
        if "training diverged" not in str(error):
            raise
        print(f"{label}: diverged (POET refused to merge non-finite rotations)", file=sys.stderr)
        return {**record, "ppl": math.inf, "diverged": True}
    ppl = result["summary"]["eval/perplexity"]
    return {
        **record,
        "ppl": ppl if math.isfinite(ppl) else math.inf,
        "diverged": not math.isfinite(ppl),
        "tokens": result["summary"]["tokens"],
        "tokens_per_second": result["summary"]["train/tokens_per_second"],
        "peak_rss_mib": result["peak_rss_mib"],
        "trainable": int(re.search(r"trainable parameters: ([\d,]+)", result["stdout"]).group(1).replace(",", "")),
        "seconds": time.time() - started,
        "load_average": os.getloadavg()[0],  # near the 1-minute load of this run alone: its tokens/s are quiet
        "curve": [(r["train/tokens"], r["train/loss"]) for r in result["records"] if "train/loss" in r],
    }


def sweep_of(done: dict[Run, dict], method: str) -> dict[int, float]:
    """Seed 0's validation perplexity at each lr exponent run so far for a method (inf where it diverged)."""
    return {
        run.exponent: record["ppl"]
        for run, record in done.items()
        if run.method == method and not run.seed and not run.ablation
    }


def best_exponent(sweep: dict[int, float]) -> int:
    """The lr exponent with the lowest perplexity (the lower lr on a tie)."""
    return min(sorted(sweep), key=lambda exponent: sweep[exponent])


def next_run(done: dict[Run, dict], args: argparse.Namespace) -> Optional[Run]:
    """The next run the benchmark needs: every method's first grid, then extensions, seeds, and ablations."""
    pending = [Run(name, exponent, 0) for name in args.methods for exponent in args.lr_steps]
    pending += [
        Run(name, step, 0)
        for name in args.methods
        if all(Run(name, k, 0) in done for k in args.lr_steps)
        and (step := next_extension(sweep_of(done, name), args.max_lr_points)) is not None
    ]
    for name in args.methods:
        if settled(done, name, args):
            best = best_exponent(sweep_of(done, name))
            pending += [Run(name, best, seed) for seed in range(args.seeds)]
            if name == BASE:
                seeds = range(args.ablation_seeds)
                pending += [Run(name, best, seed, ablation) for ablation in args.ablations for seed in seeds]
    return next((run for run in pending if run not in done), None)


def next_extension(sweep: dict[int, float], max_points: int) -> Optional[int]:
    """The next exponent to widen a sweep by: outwards from the best while it sits at an edge."""
    if len(sweep) >= max_points:
        return None
    best = best_exponent(sweep)
    if not math.isfinite(sweep[best]):
        return min(sweep) - 1  # diverged at every lr so far: go lower
    if best == max(sweep):
        return max(sweep) + 1
    if best == min(sweep):
        return min(sweep) - 1
    return None


def settled(done: dict[Run, dict], name: str, args: argparse.Namespace) -> bool:
    """Whether a method's first grid is done and its sweep needs no more lrs."""
    sweep = sweep_of(done, name)
    return all(k in sweep for k in args.lr_steps) and next_extension(sweep, args.max_lr_points) is None


def mean_sd(values: list[float]) -> str:
    """`mean ± sd` of finite values (sd 0 for one), or `diverged`."""
    if not values or not all(math.isfinite(value) for value in values):
        return "diverged"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def report(done: dict[Run, dict], args: argparse.Namespace) -> list[str]:
    """The Markdown report of every run in the results file that belongs to this setting."""
    shape = MODEL_SIZES[args.model_size]
    hidden, ffn, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    block_params = layers * (4 * hidden**2 + 3 * hidden * ffn)
    total = next((r["trainable"] for run, r in done.items() if run.method == "adamw" and "trainable" in r), None)
    tokens = next((r["tokens"] for r in done.values() if "tokens" in r), 0)
    share = f" of {total:,} ({block_params / total:.0%})" if total else ""
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [
        f"Pretraining benchmark, {date.today()}, {machine}, torch {torch.__version__}, {len(done)} runs",
        f"`python benchmarks/bench_pretrain.py --model_size {args.model_size} --vocab_size {args.vocab_size} --steps "
        f"{args.steps} --batch_size {args.batch_size} --block_size {args.block_size} --eval_samples "
        f"{args.eval_samples} --lr_step {args.lr_step:g} --warmup_steps {args.warmup_steps}`",
        f"(run_clm.py's {args.model_size} LLaMA, hidden {hidden}, {layers} layers, {args.vocab_size}-token BPE: "
        f"block linears {block_params:,} parameters{share}; {tokens:,} tokens per run = "
        f"{tokens / block_params:.2f} tokens per block parameter; validation on {args.eval_samples} sequences)",
        "",
        "| method | best lr | validation ppl (mean ± sd) | seeds | tokens/s (quiet runs) | peak RSS (MiB) | "
        "trainable params | ppl at each lr (seed 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ranked = []
    for name in METHOD_NAMES:
        sweep = sweep_of(done, name)
        if not sweep:
            continue
        best = best_exponent(sweep)
        runs = [r for run, r in done.items() if run.method == name and run.exponent == best and not run.ablation]
        ppls = [r["ppl"] for r in runs]
        ranked.append((statistics.mean(ppls), name, best, runs))
    for mean, name, best, runs in sorted(ranked):
        sweep = sweep_of(done, name)
        lrs = {
            run.exponent: r["lr"] for run, r in done.items() if run.method == name and not run.seed and not run.ablation
        }
        swept = ", ".join(f"{lrs[k]:.3g}: {sweep[k]:.1f}" if math.isfinite(sweep[k]) else f"{lrs[k]:.3g}: diverged"
                          for k in sorted(sweep))  # fmt: skip
        edge = "" if settled(done, name, args) else " (sweep still at an edge)"
        finished = [r for r in runs if "tokens_per_second" in r]
        quiet = [r["tokens_per_second"] for r in finished if r["load_average"] <= QUIET_LOAD]
        speed = f"{statistics.median(quiet):,.0f}" if quiet else "(busy machine)" if finished else ""
        memory = f"{max(r['peak_rss_mib'] for r in finished):.0f}" if finished else ""
        trainable = f"{finished[0]['trainable']:,}" if finished else ""
        lines.append(
            f"| {name} | {lrs[best]:.3g}{edge} | {mean_sd([r['ppl'] for r in runs])} | {len(runs)} | {speed} | "
            f"{memory} | {trainable} | {swept} |"
        )
    ablations = [(group, variant) for group, variants in ABLATION_GROUPS.items() for variant in variants]
    rows = [(group, variant, [r["ppl"] for run, r in done.items() if run.ablation == variant])
            for group, variant in ablations]  # fmt: skip
    if any(ppls for _, _, ppls in rows) and sweep_of(done, BASE):
        best = best_exponent(sweep_of(done, BASE))
        base = [
            r["ppl"]
            for run, r in done.items()
            if run.method == BASE and run.exponent == best and not run.ablation and run.seed < args.ablation_seeds
        ]  # the base over the ablations' own seeds
        lines += ["", f"Ablations of {BASE} at its best lr (the base: normalized-Gaussian W0, T_m 200, k = 3):", ""]
        lines += ["| ablation | setting | validation ppl (mean ± sd) | seeds | vs the base |", "|---|---|---|---|---|"]
        lines.append(f"| base | W0 normalized Gaussian, T_m 200, k=3 | {mean_sd(base)} | {len(base)} | |")
        for group, variant, ppls in rows:
            if ppls:
                change = (
                    f"{statistics.mean(ppls) / statistics.mean(base) - 1:+.1%}"
                    if all(map(math.isfinite, ppls + base))
                    else ""
                )
                lines.append(f"| {group} | {variant} | {mean_sd(ppls)} | {len(ppls)} | {change} |")
    return lines


def main() -> None:
    """Run what the benchmark still needs (at most --max_runs), then print (and optionally record) the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=METHOD_NAMES)
    parser.add_argument("--model_size", choices=list(MODEL_SIZES), default="tiny", help="as in run_clm.py")
    parser.add_argument("--vocab_size", type=int, default=1024, help="run_clm.py's BPE size")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (equal tokens)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--eval_samples", type=int, default=200, help="validation sequences")
    parser.add_argument("--warmup_steps", type=int, default=0, help="linear lr warm-up of every method (run_clm's)")
    parser.add_argument("--lr_step", type=float, default=2.0, help="ratio of neighbouring lrs of a sweep")
    parser.add_argument("--lr_steps", type=int, nargs="+", default=[-1, 0, 1], help="first grid: centre × step^k")
    parser.add_argument("--max_lr_points", type=int, default=6, help="widen a sweep at most to this many lrs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds at each method's best lr")
    parser.add_argument(
        "--ablations", nargs="*", default=[], choices=[*ABLATIONS, "all"], help=f"variants of {BASE} to run"
    )
    parser.add_argument("--ablation_seeds", type=int, default=2)
    parser.add_argument("--max_runs", type=int, help="stop after this many new runs (0: only report)")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("pretrain_runs.jsonl"))
    parser.add_argument("--record", type=Path, help="append the report to this Markdown file")
    parser.add_argument("--plot", type=Path, help="draw each method's best run's loss curve to this PNG")
    args = parser.parse_args()
    args.ablations = list(ABLATIONS) if "all" in args.ablations else args.ablations

    done: dict[Run, dict] = {}
    if args.results.exists():
        for record in map(json.loads, args.results.read_text().splitlines()):
            if {"warmup_steps": 0, **record["setting"]} == setting(args):  # runs from before the flag had none
                done[Run(record["method"], record["exponent"], record["seed"], record["ablation"])] = record
    with tempfile.TemporaryDirectory() as workdir, tqdm(desc="runs", unit="run") as progress:
        while (args.max_runs is None or progress.n < args.max_runs) and (run := next_run(done, args)):
            done[run] = train(run, args, Path(workdir))
            with args.results.open("a") as results:
                results.write(json.dumps(done[run]) + "\n")
            progress.update()
    publish("\n".join(report(done, args)), args.record)
    if args.plot:
        curves = {}
        for name in METHOD_NAMES:
            if sweep := sweep_of(done, name):
                run = done[Run(name, best_exponent(sweep), 0)]
                if run.get("curve"):
                    curves[f"{name} (lr {run['lr']:.3g}): ppl {run['ppl']:.1f}"] = run["curve"]
        if curves:
            top = min(8.0, max((loss for curve in curves.values() for _, loss in curve[2:]), default=8.0))
            title = f"run_clm.py's {args.model_size} LLaMA, {args.steps} steps, each method at its best lr (seed 0)"
            plot_loss_curves(curves, args.plot, title, top)


if __name__ == "__main__":
    main()
