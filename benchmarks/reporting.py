"""What the benchmarks do with their results: print them, append them to a Markdown file, draw loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def publish(report: str, record: Optional[Path]) -> None:
    """Print the report and, if `record` is given, append it to that file after a blank line."""
    print(report)
    if record:
        with record.open("a", encoding="utf-8") as handle:
            handle.write("\n" + report + "\n")


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str, top: float) -> None:
    """Training loss against tokens (millions), one labelled curve per entry, into a PNG (y axis cut at `top`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for label, curve in curves.items():
        tokens, losses = zip(*curve)
        axis.plot([t / 1e6 for t in tokens], losses, label=label, lw=1.2)
    axis.set(xlabel="training tokens (millions)", ylabel="training loss (10-step mean)", ylim=(None, top))
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
