"""The `poet-peft` command.

`poet-peft plot METRICS.jsonl [...] -o DIR` draws a run's spectral metrics; `poet-peft export --adapter DIR --out DIR`
writes a merged, Hub-ready checkpoint of a finetuned adapter (`--push-to-hub REPO_ID` uploads it);
`poet-peft convert --from-poetx DIR --out DIR` turns a POET-X checkpoint into a base model and a PEFT POET adapter,
and `--to-poetx ADAPTER` turns one back.

A module beside the poet_peft package rather than inside it: importing poet_peft imports torch, PEFT and
Transformers (seconds), which `--help` and a mistyped flag should not wait for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional


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
    export = commands.add_parser(
        "export",
        help="a merged checkpoint of a finetuned adapter, with a model card, ready for the Hub",
        description="Merge an adapter into its base model and write safetensors weights, config, tokenizer, "
        "generation config and a model card that plain Transformers loads; optionally push it to the Hub.",
    )
    export.add_argument("--adapter", type=Path, required=True, help="the adapter folder (or a fully finetuned model)")
    export.add_argument("--base", help="the base model (Hub id or folder); default: the one adapter_config.json names")
    export.add_argument("--out", type=Path, required=True, help="where the merged model goes")
    export.add_argument("--push-to-hub", "--push_to_hub", dest="push_to_hub", metavar="REPO_ID", help="upload it")
    export.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    convert = commands.add_parser(
        "convert",
        help="a POET-X (Sphere-AI-Lab/poet) checkpoint to a base model + PEFT POET adapter, or back",
        description="--from-poetx writes OUT/base and OUT/adapter; --to-poetx writes OUT/model.safetensors in "
        "POET-X's layout with config.json. Round trips are exact.",
    )
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-poetx", "--from_poetx", dest="from_poetx", type=Path, help="a POET-X checkpoint folder")
    source.add_argument("--to-poetx", "--to_poetx", dest="to_poetx", type=Path, help="a PEFT POET adapter folder")
    convert.add_argument("--base", help="with --to-poetx: the base model; default: the one adapter_config.json names")
    convert.add_argument("--out", type=Path, required=True, help="where the converted checkpoint goes")
    return parser


def plot_command(args: argparse.Namespace) -> list[Path]:
    """Read the metrics files and write the PNGs."""
    from poet_peft.plots import SpectralSeries, plot_runs

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


def export_command(args: argparse.Namespace) -> Path:
    """Merge and write the checkpoint, then push it if asked."""
    from poet_peft import export_merged

    folder = export_merged(args.adapter, args.out, args.base, args.push_to_hub, args.overwrite)
    print(f"Merged model written to {folder}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return folder


def convert_command(args: argparse.Namespace) -> Path:
    """Convert in the direction asked and say where the result is."""
    from poet_peft import convert_from_poetx, convert_to_poetx

    if args.from_poetx:
        base, adapter = convert_from_poetx(args.from_poetx, args.out)
        print(f"Base model written to {base}, POET adapter to {adapter}")
        return args.out
    folder = convert_to_poetx(args.to_poetx, args.out, args.base)
    print(f"POET-X checkpoint written to {folder}")
    return folder


COMMANDS = {"plot": plot_command, "export": export_command, "convert": convert_command}


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; errors in the input print one line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from poet_peft import HubPushError

    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, HubPushError) as error:
        parser.exit(2, f"poet-peft {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
