"""SpectralMonitor (seed 002): the spectra of chosen weight matrices during training, and the loggers it writes to.

Every `every` optimizer steps, for each module whose name matches a target pattern, a top-k SVD of a matrix M (the
module's effective weight, its gradient, or its Adam first moment) gives, under `spec/<module>/`:
- `sigma_max` and `sv1`..`svk`;
- `delta_sv_rel` = ‖s_t − s_{t−1}‖/‖s_{t−1}‖ against the previous measurement;
- `cos_u1`..`cos_uk`, `cos_v1`..`cos_vk`: the principal cosines of the top-k left and right singular subspaces
  against the previous measurement's, largest first, and their `cos_u_max`, `cos_u_mean`, `cos_v_max`, `cos_v_mean`.
With source="weight" also `spectrum_drift` = ‖s_t − s_0‖/‖s_0‖ of the top-k singular values against those at `bind`
time and the rows' `hyperspherical_energy`; for POET layers `orth_err_R` and `orth_err_P` (‖RRᵀ − I‖_F).
`spec/seconds` is what the measurement took. Module names drop PEFT's `base_model.model.`, so a PEFT-wrapped run
and a plain one log the same keys.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import extract_model_from_parallel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .ops.seeding import seeded_generator
from .ops.spectral import hyperspherical_energy, principal_cosines, top_singular
from .state_files import load_state, save_state

SOURCES = ("weight", "grad", "momentum")
PEFT_PREFIX = "base_model.model."
MONITOR_STATE = "spectral_monitor"  # spectral_monitor.json + .safetensors in each checkpoint (state_files)


def _relative_change(reference: torch.Tensor, current: torch.Tensor) -> float:
    return ((current - reference).norm() / reference.norm().clamp_min(torch.finfo(reference.dtype).tiny)).item()


@torch.no_grad()
def probed_weight(layer: nn.Module, in_features: int) -> torch.Tensor:
    """The (out, in) matrix a linear layer applies, read off its outputs: column j is f(e_j) − f(0), in float64.

    For adapter layers that have no closed form here (PEFT's own LoRA, OFT, …). It probes a float64 copy in eval
    mode (no dropout), so neither a half-precision bias's rounding nor the layer's own training mode enters.
    """
    probe = copy.deepcopy(layer).to(torch.float64).eval()
    device = next(probe.parameters()).device
    offset = probe(torch.zeros(1, in_features, dtype=torch.float64, device=device))
    eye = torch.eye(in_features, dtype=torch.float64, device=device)
    columns = [probe(eye[start : start + 1024]) - offset for start in range(0, in_features, 1024)]
    return torch.cat(columns).t()


class SpectralMonitor:
    """Seed 002's spectral metrics of the modules matching `targets`, every `every` optimizer steps.

    `targets` are module-name patterns, as a list or one comma-separated string: a pattern matches a name it equals or
    ends with after a dot ("q_proj", "self_attn.q_proj"), and may use glob wildcards ("layers.0.*"). `source` picks
    the matrix: the module's effective weight (POET's R·W0·P, a LoRA's W + ΔW), its gradient, or its Adam first
    moment (exp_avg); the latter two need the module's own weight to train. Matrices larger than 1024 on a side get a
    randomized top-k SVD drawn from `seed`, never from the global RNG. Call `bind(model, optimizer)` once, then
    `after_step(step, accelerator)` after every `optimizer.step()` and before `zero_grad()` (source="grad" reads the
    gradients); `SpectralMonitorCallback` does both inside Trainer.
    """

    def __init__(
        self,
        targets: Union[str, Iterable[str]],
        every: int = 100,
        topk: int = 8,
        source: Literal["weight", "grad", "momentum"] = "weight",
        seed: int = 0,
    ):
        patterns = [p.strip() for p in (targets.split(",") if isinstance(targets, str) else targets)]
        if not all(patterns) or not patterns:
            raise ValueError(f"SpectralMonitor: targets={targets!r} holds an empty pattern; give module-name patterns.")
        if source not in SOURCES:
            raise ValueError(f"SpectralMonitor: source={source!r} is not valid; use one of {', '.join(SOURCES)}.")
        if every < 1 or topk < 1:
            raise ValueError(f"SpectralMonitor: every={every} and topk={topk} must both be ≥ 1.")
        self.patterns, self.every, self.topk, self.source, self.seed = patterns, every, topk, source, seed
        self.modules: dict[str, nn.Module] = {}
        self.optimizer = None
        self.initial_values: dict[str, torch.Tensor] = {}
        self.previous: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.last_step: Optional[int] = None  # of the latest measurement: where a resumed JSONL log continues
        self._restored = False
        self._logs: dict[int, MetricsLog] = {}

    def matches(self, name: str) -> bool:
        """Whether a module name matches one of the target patterns."""
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in self.patterns)

    def bind(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> SpectralMonitor:
        """Find the target modules of `model` (the optimizer is needed for source="momentum"); returns self.

        With source="weight" the top-k singular values now are the reference that `spectrum_drift` is measured from,
        unless a resumed `load_state_dict` brought the original ones.
        """
        model = extract_model_from_parallel(model, keep_torch_compile=False)
        found: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            name = name.removeprefix(PEFT_PREFIX)
            inside_found = any(name.startswith(parent + ".") for parent in found)
            if not inside_found and _has_matrix(module) and self.matches(name):
                found[name] = module
        if not found:
            names = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if _has_matrix(m)})
            raise ValueError(
                f"SpectralMonitor: no module matches targets {', '.join(self.patterns)}. This model's weight matrices "
                f"are named: {', '.join(names) or '(none)'}."
            )
        for name, module in found.items():
            if not hasattr(module, "effective_weight") and isinstance(module, BaseTunerLayer):
                if not isinstance(module.get_base_layer(), (nn.Linear, Conv1D)):
                    raise ValueError(
                        f"SpectralMonitor cannot read {name}: it is a {type(module).__name__} adapter over a "
                        f"{type(module.get_base_layer()).__name__}, and only Linear and Conv1D layers have a weight "
                        "matrix it can read. Leave it out of targets."
                    )
        if self.source == "momentum" and optimizer is None:
            raise ValueError("SpectralMonitor: source='momentum' reads Adam's exp_avg; pass the optimizer to bind().")
        if self.source != "weight":
            for name, module in found.items():
                _check_trained_weight(name, module, self.source)
        self.modules, self.optimizer = found, optimizer
        if self.source == "weight" and PartialState().is_main_process:  # only the main process measures
            for name, module in found.items():
                matrix = self._matrix(module)
                # A matrix holding NaN or inf gets its reference spectrum at its first finite measurement instead.
                if name not in self.initial_values and torch.isfinite(matrix).all():
                    self.initial_values[name] = top_singular(matrix, self.topk, self._generator(name, 0))[1]
        return self

    def _generator(self, name: str, step: int) -> torch.Generator:
        return seeded_generator(self.seed, "spectral-monitor", name, step)

    def _matrix(self, module: nn.Module) -> Optional[torch.Tensor]:
        # The (out, in) matrix to decompose; None while a gradient or momentum does not exist yet.
        if self.source == "weight":
            if hasattr(module, "effective_weight"):
                return module.effective_weight()
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                return probed_weight(module, base.weight.shape[0 if isinstance(base, Conv1D) else 1])
            return module.weight.t() if isinstance(module, Conv1D) else module.weight
        weight = module.weight
        tensor = weight.grad if self.source == "grad" else self.optimizer.state.get(weight, {}).get("exp_avg")
        if tensor is None:
            return None
        return tensor.t() if isinstance(module, Conv1D) else tensor

    @torch.no_grad()
    def measure(self, step: int) -> dict[str, float]:
        """Measure every target now; the metrics, named `spec/<module>/<metric>` ({} while no matrix exists yet)."""
        if not self.modules:
            raise RuntimeError("SpectralMonitor.measure: call bind(model) first.")
        start = time.perf_counter()
        metrics = {}
        for name, module in self.modules.items():
            matrix = self._matrix(module)
            if matrix is None:
                continue
            matrix = matrix.detach().double()
            if not torch.isfinite(matrix).all():  # a diverged weight or an fp16 overflow step: say so, keep training
                metrics[f"spec/{name}/nonfinite"] = 1.0
                continue
            left, values, right = top_singular(matrix, min(self.topk, *matrix.shape), self._generator(name, step))
            prefix = f"spec/{name}/"
            metrics[prefix + "sigma_max"] = values[0].item()
            metrics.update({f"{prefix}sv{i}": value for i, value in enumerate(values.tolist(), 1)})
            if name in self.previous:
                old_values, old_left, old_right = (t.to(matrix.device) for t in self.previous[name])
                metrics[prefix + "delta_sv_rel"] = _relative_change(old_values, values)
                cosines_by_side = {"u": principal_cosines(old_left, left), "v": principal_cosines(old_right, right)}
                for side, cosines in cosines_by_side.items():
                    metrics.update({f"{prefix}cos_{side}{i}": c for i, c in enumerate(cosines.tolist(), 1)})
                    metrics[f"{prefix}cos_{side}_max"] = cosines.max().item()
                    metrics[f"{prefix}cos_{side}_mean"] = cosines.mean().item()
            if self.source == "weight":
                self.initial_values.setdefault(name, values.cpu())
                metrics[prefix + "spectrum_drift"] = _relative_change(self.initial_values[name].to(values), values)
                metrics[prefix + "hyperspherical_energy"] = hyperspherical_energy(matrix)
                if hasattr(module, "orthogonality_errors"):
                    metrics[prefix + "orth_err_R"], metrics[prefix + "orth_err_P"] = module.orthogonality_errors()
            self.previous[name] = (values.cpu(), left.cpu(), right.cpu())  # off the GPU between measurements
        if not metrics:  # no gradient or momentum yet: nothing to log
            return {}
        self.last_step = step
        metrics["spec/seconds"] = time.perf_counter() - start
        return metrics

    def after_step(self, step: int, log: Union[Accelerator, MetricsLog, None] = None) -> dict[str, float]:
        """After optimizer step `step`: on a multiple of `every`, measure and log (main process only); else `{}`.

        `log` is an Accelerator (its trackers, or `spectral_metrics.jsonl` in its project_dir when it has none)
        or a MetricsLog; None only returns the metrics.
        """
        if step % self.every or not PartialState().is_main_process:
            return {}
        if isinstance(log, Accelerator):
            if id(log) not in self._logs:  # one log per accelerator: a second would refuse the first one's file
                # A restored monitor continues its file after its last measurement; a fresh one starts it.
                self._logs[id(log)] = MetricsLog(log, resume_step=self.last_step if self._restored else None)
            log = self._logs[id(log)]
        metrics = self.measure(step)
        if log is not None and metrics:
            log.log(metrics, step)
        return metrics

    def state_dict(self) -> dict:
        """The reference spectra and the last measurement, so that a resumed run continues the same series."""
        return {
            "topk": self.topk,
            "last_step": self.last_step,
            "initial_values": dict(self.initial_values),
            "previous": {name: list(triplet) for name, triplet in self.previous.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved (by a monitor with the same topk)."""
        if state["topk"] != self.topk:
            raise ValueError(
                f"SpectralMonitor: the saved state has topk={state['topk']}, this monitor topk={self.topk}: its "
                "spectra and subspaces cannot continue. Resume with the same topk, or start a new log."
            )
        self.last_step = state["last_step"]
        self.initial_values = dict(state["initial_values"])
        self.previous = {name: tuple(triplet) for name, triplet in state["previous"].items()}
        self._restored = True


def _has_matrix(module: nn.Module) -> bool:
    if hasattr(module, "effective_weight") or isinstance(module, BaseTunerLayer):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 2


def _check_trained_weight(name: str, module: nn.Module, source: str) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(module, BaseTunerLayer) or not isinstance(weight, nn.Parameter) or not weight.requires_grad:
        raise ValueError(
            f"SpectralMonitor: source={source!r} needs {name}'s own weight to train, but it is a "
            f"{type(module).__name__} whose weight is frozen (its adapter trains instead). Use source='weight', or "
            "targets whose weights train."
        )


def _step_of(line: str, unreadable: int) -> int:
    # A line cut short by a crash mid-write counts as `unreadable` (past the resume point: dropped).
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return unreadable


class JsonlLog:
    """Append `{"step": …, **metrics}` lines to a file; a resumed run first drops what came after its checkpoint."""

    def __init__(self, path: Union[str, os.PathLike], resume_step: Optional[int] = None):
        self.path = Path(path)
        if resume_step is None and self.path.is_file() and self.path.stat().st_size:
            raise FileExistsError(
                f"{self.path} holds the metrics of an earlier run. Delete it or log elsewhere, or pass "
                "resume_step=<the step you resume from> to continue it."
            )
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [
                line for line in self.path.read_text().splitlines() if _step_of(line, resume_step + 1) <= resume_step
            ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(line + "\n" for line in kept))
        os.replace(partial, self.path)  # a crash mid-write leaves the old file whole

    def log(self, metrics: dict, step: int) -> None:
        """Append one line."""
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")


class MetricsLog:
    """Metrics to Accelerate's trackers (TensorBoard, W&B, trackio, …) and to a JSONL file, from the main process.

    The file is written whenever `path` is given, and as the fallback when the accelerator has no tracker:
    `spectral_metrics.jsonl` in its project_dir (or the working directory).
    """

    def __init__(
        self, accelerator: Accelerator, path: Union[str, os.PathLike, None] = None, resume_step: Optional[int] = None
    ):
        self.accelerator = accelerator
        self.use_trackers = bool(accelerator.log_with)
        if path is None and not self.use_trackers:
            path = Path(accelerator.project_dir or ".") / "spectral_metrics.jsonl"
        self.file = JsonlLog(path, resume_step) if path is not None and accelerator.is_main_process else None

    def log(self, metrics: dict, step: int) -> None:
        """Record metrics at an optimizer step, everywhere they go."""
        if self.use_trackers:
            self.accelerator.log(metrics, step=step)
        if self.file is not None:
            self.file.log(metrics, step)


def summary_line(metrics: dict[str, float], step: int) -> str:
    """One line about a measurement: how many matrices, the largest σ_max and spectrum drift, what it took."""
    values = {
        suffix: [v for k, v in metrics.items() if k.endswith("/" + suffix)]
        for suffix in ("sigma_max", "spectrum_drift")
    }
    parts = [f"spectral monitor, step {step}: {len(values['sigma_max'])} matrices"]
    if values["sigma_max"]:
        parts.append(f"largest σ_max {max(values['sigma_max']):.4g}")
    if values["spectrum_drift"]:
        parts.append(f"largest spectrum drift {max(values['spectrum_drift']):.3g}")
    nonfinite = sum(1 for key in metrics if key.endswith("/nonfinite"))
    if nonfinite:
        parts.append(f"{nonfinite} with NaN or inf")
    return ", ".join(parts) + f" ({metrics.get('spec/seconds', 0.0):.2f} s)"


class SpectralMonitorCallback(TrainerCallback):
    """Runs a SpectralMonitor inside transformers.Trainer: `trainer.add_callback(SpectralMonitorCallback(trainer, m))`.

    It binds the monitor to Trainer's model and optimizer, measures at step 0 and after every `every`-th optimizer
    step (while gradients still exist), and logs as `trainer.log` does, so every `report_to` integration and the
    trainer state's log history get the metrics, without touching Trainer's own logging; the console gets one line.
    With `report_to="none"` they also go to `<output_dir>/spectral_metrics.jsonl`. Each checkpoint gets the
    monitor's state (`spectral_monitor.json` and `.safetensors`, no pickle), and a resumed run continues the same
    series from it.
    """

    def __init__(self, trainer, monitor: SpectralMonitor):
        self.trainer = trainer
        self.monitor = monitor
        self.pending: dict[str, float] = {}
        self.file: Optional[JsonlLog] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Bind to the model and optimizer Trainer built; restore a resumed run's state, or measure step 0."""
        if self.trainer.is_fsdp_enabled:
            raise ValueError("SpectralMonitorCallback reads whole weight matrices, which FSDP shards: use DDP.")
        self.monitor.bind(model, optimizer)
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.global_step and (checkpoint / f"{MONITOR_STATE}.json").is_file():
            load_state(self.monitor, checkpoint, MONITOR_STATE)
        if not args.report_to and state.is_world_process_zero:  # TrainingArguments turns "none" into []
            path = Path(args.output_dir) / "spectral_metrics.jsonl"
            if not state.global_step and path.is_file():
                # A fresh train() over an earlier one, which Trainer allows: keep the earlier metrics beside it.
                earlier = path.with_name(f"spectral_metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
                os.replace(path, earlier)
                print(f"spectral monitor: the earlier run's metrics moved to {earlier}")
            self.file = JsonlLog(path, resume_step=state.global_step or None)
        if state.global_step == 0:
            self.pending = self.monitor.after_step(0)
            self.on_step_end(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        """Save the monitor's state into the checkpoint Trainer just wrote."""
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            save_state(self.monitor, folder, MONITOR_STATE)

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Measure right after the optimizer step, before Trainer zeroes the gradients."""
        self.pending = self.monitor.after_step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        """Log what the step measured, now that Trainer counts the step."""
        if self.pending:
            self._log(self.pending, args, state, control)
            self.pending = {}

    def _log(self, metrics: dict, args, state, control) -> None:
        # What Trainer.log does (log history, then every callback's on_log: the report_to integrations), except
        # that it would clear control.should_log, swallowing Trainer's own loss log due this step, and that the
        # progress callbacks would print the whole dict of some thousand characters: a one-line summary instead.
        logs = {**metrics, **({"epoch": state.epoch} if state.epoch is not None else {})}
        state.log_history.append({**logs, "step": state.global_step})
        for callback in self.trainer.callback_handler.callbacks:
            if not isinstance(callback, (ProgressCallback, PrinterCallback, SpectralMonitorCallback)):
                callback.on_log(args, state, control, logs=logs, model=self.trainer.model)
        if state.is_world_process_zero:
            print(summary_line(metrics, state.global_step))
        if self.file is not None:
            self.file.log(metrics, state.global_step)
