"""The `poet-peft` command: `poet-peft plot METRICS.jsonl [...] -o DIR` draws a run's spectral metrics."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .plots import SpectralSeries, plot_runs


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser, with one subcommand per job."""
    parser = argparse.ArgumentParser(prog="poet-peft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plot = commands.add_parser(
        "plot",
        help="PNGs of SpectralMonitor metrics (σ_max, principal cosines, spectra, drift, orthogonality)",
        description="Draw the spec/<module>/… metrics of one or more runs; several runs go side by side.",
    )
    plot.add_argument("metrics", nargs="+", type=Path, help="metrics JSONL files (run_clm's metrics.jsonl, …)")
    plot.add_argument("-o", "--output_dir", "--output-dir", type=Path, required=True, help="where the PNGs go")
    plot.add_argument("--labels", help="comma-separated run names (default: each file's folder name)")
    return parser


def plot_command(args: argparse.Namespace) -> list[Path]:
    """Read the metrics files and write the PNGs."""
    if args.labels:
        labels = args.labels.split(",")
    else:  # each file's folder name, or its whole path where two folders share a name
        labels = [path.resolve().parent.name for path in args.metrics]
        if len(set(labels)) != len(labels):
            labels = [str(path.resolve().parent) for path in args.metrics]
    if len(labels) != len(args.metrics) or len(set(labels)) != len(labels):
        raise ValueError(
            f"--labels gives {len(labels)} names ({', '.join(labels)}) for {len(args.metrics)} metrics files: give "
            "one distinct name per file."
        )
    runs = {label: SpectralSeries.read(path) for label, path in zip(labels, args.metrics)}
    written = plot_runs(runs, args.output_dir)
    for path in written:
        print(path)
    return written


COMMANDS = {"plot": plot_command}


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; errors in the input print one line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, ImportError) as error:
        parser.exit(2, f"poet-peft {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
