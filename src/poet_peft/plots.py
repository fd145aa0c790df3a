"""Pictures of SpectralMonitor logs: σ_max trajectories, principal-cosine heatmaps, spectra, drift and orthogonality.

Each function takes one or more runs, as {label: SpectralSeries}, and writes one PNG; `plot_runs` writes them all.
Several runs go side by side (or overlaid where one axis compares them better), so that AdamW's log next to
POET's shows which spectrum moves.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Union

SPEC_PREFIX = "spec/"


class SpectralSeries:
    """A run's spectral metrics: `values[module][metric]` is a list of (step, value), in the order logged."""

    def __init__(self, records: list[dict]):
        self.values: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        for record in records:
            for key, value in record.items():
                if key.startswith(SPEC_PREFIX) and key.count("/") >= 2 and value is not None:
                    module, _, metric = key[len(SPEC_PREFIX) :].rpartition("/")
                    self.values[module][metric].append((record["step"], float(value)))

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> SpectralSeries:
        """Read a metrics JSONL file (run_clm's metrics.jsonl, or the monitor's spectral_metrics.jsonl)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such metrics file.")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        try:
            series = cls([json.loads(line) for line in lines])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f'{path} is not a metrics JSONL file of {{"step": …, …}} lines: {error}') from error
        if not series.modules:
            raise ValueError(
                f"{path} has no spectral metrics (spec/<module>/…). Log them with --spec-monitor in the examples, or "
                "poet_peft.SpectralMonitor in your own loop."
            )
        return series

    @property
    def modules(self) -> list[str]:
        """The monitored modules, in the order first logged."""
        return list(self.values)

    def has(self, metric: str) -> bool:
        """Whether any module logged this metric."""
        return any(metric in metrics for metrics in self.values.values())

    def series(self, module: str, metric: str) -> tuple[list[int], list[float]]:
        """Steps and values of one module's metric."""
        pairs = self.values[module].get(metric, [])
        return [step for step, _ in pairs], [value for _, value in pairs]

    def spectrum(self, module: str, index: int) -> list[float]:
        """sv1..svk at one measurement (0 the first, −1 the last)."""
        metrics = self.values[module]
        count = sum(1 for name in metrics if name.startswith("sv") and name[2:].isdigit())
        return [metrics[f"sv{i}"][index][1] for i in range(1, count + 1)]


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("Plotting needs matplotlib: pip install 'poet-peft[plot]'") from error
    matplotlib.use("Agg")  # files only: no display needed, none opened
    from matplotlib import pyplot

    return pyplot


def _kind(module: str) -> str:
    # The module's own name (q_proj, down_proj, …): one colour per kind, shared across layers.
    return module.rpartition(".")[2]


def _kind_colors(runs: dict[str, SpectralSeries]) -> dict[str, tuple]:
    pyplot = _pyplot()
    kinds = list(dict.fromkeys(_kind(m) for series in runs.values() for m in series.modules))
    palette = pyplot.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    return {kind: palette(i % palette.N) for i, kind in enumerate(kinds)}


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def _panels(count: int, width: float = 5.0, height: float = 3.6, rows: int = 1):
    columns = math.ceil(count / rows)
    figure, axes = _pyplot().subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    return figure, axes.ravel()


def _kind_legend(axis, colors: dict[str, tuple]) -> None:
    for kind, color in colors.items():
        axis.plot([], [], color=color, label=kind)
    axis.legend(fontsize="small")


def plot_sigma_max(runs: dict[str, SpectralSeries], path: Path) -> Path:
    """σ_max of every module over training, one panel per run, one colour per module kind."""
    colors = _kind_colors(runs)
    figure, axes = _panels(len(runs))
    for axis, (label, series) in zip(axes, runs.items()):
        for module in series.modules:
            axis.plot(*series.series(module, "sigma_max"), color=colors[_kind(module)], lw=1, alpha=0.8)
        axis.set(title=f"{label}: σ_max per module", xlabel="step", ylabel="σ_max")
    _kind_legend(axes[0], colors)
    return _save(figure, path)


def plot_cosine_heatmaps(runs: dict[str, SpectralSeries], path: Path) -> Path:
    """Mean principal cosine against the previous measurement, module × step, for U and V of each run."""
    height = 0.18 * max(len(series.modules) for series in runs.values()) + 1.8
    figure, axes = _panels(2 * len(runs), width=6.5, height=height, rows=len(runs))
    for pair, (label, series) in enumerate(runs.items()):
        for side, axis in zip("uv", axes[2 * pair : 2 * pair + 2]):
            steps = sorted({step for m in series.modules for step in series.series(m, f"cos_{side}_mean")[0]})
            grid = [[math.nan] * len(steps) for _ in series.modules]
            for row, module in enumerate(series.modules):
                for step, value in zip(*series.series(module, f"cos_{side}_mean")):
                    grid[row][steps.index(step)] = value
            image = axis.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
            axis.set(title=f"{label}: mean cos of {side.upper()}_k vs previous", xlabel="step")
            axis.set_yticks(range(len(series.modules)), series.modules, fontsize=6)
            ticks = range(0, len(steps), max(1, len(steps) // 8))
            axis.set_xticks(list(ticks), [steps[i] for i in ticks])
            figure.colorbar(image, ax=axis, fraction=0.04)
    return _save(figure, path)


def plot_spectra(runs: dict[str, SpectralSeries], path: Path) -> Path:
    """Top-k singular values at the first and the last measurement, one row per run, one panel per module kind."""
    kinds = list(dict.fromkeys(_kind(m) for series in runs.values() for m in series.modules))
    figure, axes = _panels(len(runs) * len(kinds), width=3.2, height=2.8, rows=len(runs))
    for row, (label, series) in enumerate(runs.items()):
        for column, kind in enumerate(kinds):
            axis = axes[row * len(kinds) + column]
            for module in (m for m in series.modules if _kind(m) == kind):
                start, end = series.spectrum(module, 0), series.spectrum(module, -1)
                # The first as a wide pale band under the last: where they coincide the band frames the line.
                axis.plot(range(1, len(start) + 1), start, color="0.75", lw=4)
                axis.plot(range(1, len(end) + 1), end, color="C0", lw=1)
            axis.set(title=f"{label}: {kind}", xlabel="i", ylabel="σ_i")
        axes[row * len(kinds)].plot([], [], color="0.75", lw=4, label="first")
        axes[row * len(kinds)].plot([], [], color="C0", label="last")
        axes[row * len(kinds)].legend(fontsize="small")
    return _save(figure, path)


def _relative_to_first(values: list[float]) -> list[float]:
    # HE is 0 for a one-row matrix: nothing to be relative to.
    return [value / values[0] - 1 if values[0] else math.nan for value in values]


def plot_spectrum_drift(runs: dict[str, SpectralSeries], path: Path) -> Path:
    """Spectrum drift and relative hyperspherical energy over training, runs overlaid (thin: modules, bold: mean)."""
    figure, axes = _panels(2)
    panels = (
        (axes[0], "spectrum_drift", "‖s_t − s_0‖ / ‖s_0‖ (top-k)", lambda values: values),
        (axes[1], "hyperspherical_energy", "HE_t / HE_0 − 1", _relative_to_first),
    )
    for axis, metric, ylabel, transform in panels:
        for index, (label, series) in enumerate(runs.items()):
            curves = {}
            for module in series.modules:
                steps, values = series.series(module, metric)
                if values:
                    curves[module] = dict(zip(steps, transform(values)))
                    axis.plot(steps, list(curves[module].values()), color=f"C{index}", lw=0.6, alpha=0.35)
            steps = sorted({step for curve in curves.values() for step in curve})
            mean = [sum(c[s] for c in curves.values() if s in c) / sum(s in c for c in curves.values()) for s in steps]
            axis.plot(steps, mean, color=f"C{index}", lw=2.2, label=label)
        axis.set(xlabel="step", ylabel=ylabel)
        axis.legend(fontsize="small")
    axes[0].set_title("Singular-value drift from the start")
    axes[0].set_yscale("symlog", linthresh=1e-7)
    axes[1].set_title("Hyperspherical energy of the rows")
    return _save(figure, path)


def plot_orthogonality(runs: dict[str, SpectralSeries], path: Path) -> Path:
    """POET's ‖RRᵀ − I‖_F and ‖PPᵀ − I‖_F per module over training, one panel per run and side."""
    colors = _kind_colors(runs)
    figure, axes = _panels(2 * len(runs), rows=len(runs))
    for pair, (label, series) in enumerate(runs.items()):
        for side, axis in zip("RP", axes[2 * pair : 2 * pair + 2]):
            for module in series.modules:
                axis.plot(*series.series(module, f"orth_err_{side}"), color=colors[_kind(module)], lw=1, alpha=0.8)
            axis.set(title=f"{label}: ‖{side}{side}ᵀ − I‖_F", xlabel="step")
            axis.set_yscale("symlog", linthresh=1e-8)  # 0 right after each merge
    _kind_legend(axes[0], colors)
    return _save(figure, path)


def plot_runs(runs: dict[str, SpectralSeries], out_dir: Union[str, os.PathLike]) -> list[Path]:
    """Write every picture that the runs' metrics allow into out_dir; returns the PNG paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        plot_sigma_max(runs, out_dir / "sigma_max.png"),
        plot_spectra(runs, out_dir / "spectra.png"),
    ]
    if any(series.has("cos_u_mean") for series in runs.values()):
        written.append(plot_cosine_heatmaps(runs, out_dir / "principal_cosines.png"))
    if any(series.has("spectrum_drift") for series in runs.values()):
        written.append(plot_spectrum_drift(runs, out_dir / "spectrum_drift.png"))
    poet_runs = {label: series for label, series in runs.items() if series.has("orth_err_R")}
    if poet_runs:
        written.append(plot_orthogonality(poet_runs, out_dir / "orthogonality.png"))
    return written
