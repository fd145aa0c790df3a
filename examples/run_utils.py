"""What run_clm.py and run_glue.py share: flags, local data files, the output folder, checkpoints and trackers."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.utils import FullyShardedDataParallelPlugin

import poet_peft
from poet_peft.guards import raise_if_nonfinite

TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRAINING_STATE = "training_state.json"


class UsageError(ValueError):
    """An error the user can fix from its message alone (a flag, a file, a folder): printed on one line."""


@contextlib.contextmanager
def usage_errors_in_one_line(program: str):
    """Turn a UsageError into one line on stderr and exit status 2, as argparse does for a bad flag."""
    try:
        yield
    except UsageError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


RUN_ARGUMENTS = "run_arguments.json"  # in a checkpoint: the flags of the run that wrote it
# Flags a resumed run may change: how long it trains, how it logs and checkpoints, where its caches are.
CHANGEABLE_ON_RESUME = {
    "max_train_steps", "num_train_epochs", "logging_steps", "eval_steps", "checkpointing_steps",
    "checkpoints_total_limit", "resume_from_checkpoint", "overwrite_output_dir", "report_to", "output_dir",
    "tokenizer_cache_dir", "preprocessing_num_workers", "per_device_eval_batch_size", "target_perplexity",
}  # fmt: skip
RUN_MARKER = ".poet_peft_run"  # in an output folder: a run of these scripts wrote it, so --overwrite_output_dir may
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


# ----------------------------------------------------------------------------------------------------------- flags
def parse_block(text: str) -> float:
    """A POET block: an integer b for POET-BS, a fraction such as 0.5 or 1/2 for POET-FS."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"--block {text!r}: use an integer b ≥ 2 (POET-BS) or a fraction in (0, 1] (POET-FS)"
        )
    return int(value) if value.denominator == 1 else float(value)


def parse_neumann_terms(text: str) -> Optional[int]:
    """POET's Cayley–Neumann terms: an integer k ≥ 0, or None for "exact" (the exact Cayley transform)."""
    if text.lower() == "exact":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"--neumann_terms {text!r}: use an integer k ≥ 0 (the paper's 3) or exact")
    return int(text)


def parse_sigma_max(text: str) -> Optional[float]:
    """The spectral-LoRA clamp constant c > 0, or None for "none"."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--lora_sigma_max {text!r}: use a number > 0 (seed 002: 0.7) or none")
    return value


def add_output_arguments(parser: argparse.ArgumentParser, default_dir: str) -> argparse._ArgumentGroup:
    """The output group: folder, checkpoints, resume and trackers; the script adds its own logging flags to it."""
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default=default_dir)
    output.add_argument("--overwrite_output_dir", action="store_true", help="start over in a used --output_dir")
    output.add_argument(
        "--checkpointing_steps", type=int, help="save a resumable checkpoint every N steps (the last step always)"
    )
    output.add_argument("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints")
    output.add_argument("--resume_from_checkpoint", help='a checkpoint folder, or "latest" in --output_dir')
    output.add_argument(
        "--report_to",
        choices=["none", "tensorboard", "wandb", "trackio", "all"],
        default="none",
        help="Accelerate trackers; metrics.jsonl is always written",
    )
    return output


def add_spec_arguments(parser: argparse.ArgumentParser, default_targets: Optional[str], source_help: str) -> None:
    """The --spec-* flags of the spectral monitor (seed 002), with underscore aliases."""
    spec = parser.add_argument_group("spectral monitor (seed 002; `poet-peft plot metrics.jsonl -o DIR` draws it)")
    spec.add_argument(
        "--spec-monitor", "--spec_monitor", dest="spec_monitor", action="store_true", help="log spec/<module>/… metrics"
    )
    spec.add_argument("--spec-every", "--spec_every", dest="spec_every", type=int, default=100, help="every N steps")
    spec.add_argument("--spec-topk", "--spec_topk", dest="spec_topk", type=int, default=8, help="k singular values")
    spec.add_argument(
        "--spec-targets",
        "--spec_targets",
        dest="spec_targets",
        default=default_targets,
        help="module-name patterns" + (f" (default {default_targets})" if default_targets else ""),
    )
    spec.add_argument(
        "--spec-source",
        "--spec_source",
        dest="spec_source",
        choices=["weight", "grad", "momentum"],
        default="weight",
        help=source_help,
    )


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]) -> None:
    """Reject integer flags below 1, naming the flag."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} {value}: use an integer ≥ 1")


def set_cpu_threads(requested: Optional[int]) -> int:
    """Set torch's threads per process: `requested`, else OMP_NUM_THREADS if above 1, else this machine's cores
    divided among its processes. `accelerate launch` without a config exports OMP_NUM_THREADS=1, which would
    leave every other core idle; pass --num_threads 1 to really run on one."""
    if requested is None:
        exported = os.environ.get("OMP_NUM_THREADS", "")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        requested = int(exported) if exported.isdigit() and int(exported) > 1 else max(1, cores // local_processes)
    torch.set_num_threads(requested)
    return requested


def engage_fsdp2_on_cpu(accelerator: Accelerator) -> None:
    """Shard with FSDP2 on CPU processes too when the launch config asks for it (fsdp_version: 2).

    Accelerate only engages FSDP on accelerators: on CPU it reads the same config as gloo DDP and every process
    holds the whole model. FSDP2's `fully_shard` runs on gloo, so the state Accelerate would have set on a GPU
    machine is set here (in both of its shared states, which it reads in different places) before `prepare`.
    """
    fsdp2_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp2_requested and os.environ.get("FSDP_VERSION") == "2":
        if accelerator.distributed_type == DistributedType.MULTI_CPU:
            PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
            accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()


def distribution_summary(accelerator: Accelerator) -> str:
    """How the run is spread, e.g. "distributed: FSDP2 over 2 processes" or "distributed: one process"."""
    if accelerator.num_processes == 1:
        return "distributed: one process"
    if accelerator.is_fsdp2:
        kind = "FSDP2"
    elif accelerator.distributed_type == DistributedType.FSDP:
        kind = "FSDP1"
    else:
        kind = "DDP"
    return f"distributed: {kind} over {accelerator.num_processes} processes"


def check_tracker(report_to: str) -> None:
    """Fail early, naming the package to install, when the requested tracker is missing ("all" takes what is)."""
    module = TRACKER_MODULES.get(report_to)
    if module and importlib.util.find_spec(module) is None:
        raise ImportError(f"--report_to {report_to} needs the {module} package: pip install {module}")


# ------------------------------------------------------------------------------------------------------------ data
def local_file_extension(path: str, allowed: tuple[str, ...]) -> str:
    """A local data file's extension without compression (".csv", ".jsonl", …), checked against `allowed`."""
    suffixes = [suffix for suffix in Path(path).suffixes if suffix not in COMPRESSIONS]
    extension = suffixes[-1] if suffixes else ""
    if extension not in allowed:
        raise UsageError(
            f"{path}: unsupported file type {extension!r}; use {', '.join(allowed)} (optionally .gz, .bz2, .xz)"
        )
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    return extension


# ----------------------------------------------------------------------------------------------------- the run
def check_output_dir(args: argparse.Namespace, outputs: tuple[str, ...]) -> list[Path]:
    """Refuse, before anything is loaded, to start a new run over outputs it may not delete; returns those it may.

    --overwrite_output_dir deletes only a run this script wrote itself (the folder holds its RUN_MARKER), and only
    once `start_output_dir` is called, after every input has been validated.
    """
    output_dir = Path(args.output_dir)
    previous = [path for path in (output_dir / name for name in outputs) if path.exists()]
    if not previous or args.resume_from_checkpoint:
        return []
    if not args.overwrite_output_dir:
        raise UsageError(
            f"{output_dir} holds a previous run. Pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to delete it and start over, or another --output_dir."
        )
    if not (output_dir / RUN_MARKER).is_file():
        names = ", ".join(path.name for path in previous)
        raise UsageError(
            f"--overwrite_output_dir deletes only runs this script wrote, and {output_dir} holds {names} without its "
            f"{RUN_MARKER}: move them away yourself, or choose another --output_dir."
        )
    return previous


def start_output_dir(output_dir: Path, previous: list[Path]) -> None:
    """Delete the previous run's outputs that check_output_dir allowed, and mark the folder as this script's run."""
    state = PartialState()
    if state.is_main_process:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_MARKER).write_text(json.dumps({"script": Path(sys.argv[0]).name}) + "\n")
    state.wait_for_everyone()


def parameter_summary(model: torch.nn.Module) -> str:
    """Trainable, frozen and total parameters; a module kept in two copies (PEFT's modules_to_save) counts once."""
    trainable, total = parameter_counts(model)
    poet = sum(param.numel() for param in poet_peft.poet_parameters(model))
    detail = f" (POET Q: {poet:,})" if poet else ""
    return (
        f"trainable parameters: {trainable:,}{detail} of {total:,} ({100 * trainable / total:.2f}%); "
        f"frozen: {total - trainable:,}"
    )


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting PEFT's modules_to_save copies once."""
    counted = [param for name, param in model.named_parameters() if ".original_module." not in name]
    return sum(param.numel() for param in counted if param.requires_grad), sum(param.numel() for param in counted)


def optimizer_steps(
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_loader,
    optimizer,
    lr_scheduler,
    hooks,
    monitor: Optional[poet_peft.SpectralMonitor],
    metrics_log: poet_peft.MetricsLog,
    position: dict,
    max_train_steps: int,
    max_grad_norm: float,
) -> Iterator[tuple[int, torch.Tensor, float]]:
    """Train until position["completed_steps"] reaches max_train_steps, yielding after every optimizer step.

    It starts where `position` says (epoch, batches into it) and keeps it current; on a fresh run the monitor measures
    step 0 first. Each step clips at the hooks' norm, steps optimizer and scheduler, lets the monitor measure before
    zero_grad (--spec-source grad reads the gradients) and calls the hooks. It yields (step, the step's loss averaged
    over its micro-batches, the perf_counter time the step began).
    """
    if monitor is not None and position["completed_steps"] == 0:
        monitor.after_step(0, metrics_log)  # the spectra before training
    model.train()
    while position["completed_steps"] < max_train_steps:
        train_loader.set_epoch(position["epoch"])
        batches = accelerator.skip_first_batches(train_loader, position["batches_in_epoch"])
        started, step_loss = time.perf_counter(), torch.zeros((), device=accelerator.device)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                step_loss += loss.detach() / accelerator.gradient_accumulation_steps
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(
                        model.parameters(), hooks.clip_norm(max_grad_norm, position["completed_steps"])
                    )
                optimizer.step()
                lr_scheduler.step()
                if monitor is not None and accelerator.sync_gradients:
                    monitor.after_step(position["completed_steps"] + 1, metrics_log)
                optimizer.zero_grad()
            position["batches_in_epoch"] += 1
            if not accelerator.sync_gradients:
                continue
            position["completed_steps"] += 1
            hooks.after_step(position["completed_steps"])
            yield position["completed_steps"], step_loss, started
            if position["completed_steps"] >= max_train_steps:
                return
            started, step_loss = time.perf_counter(), torch.zeros((), device=accelerator.device)
        position["epoch"] += 1
        position["batches_in_epoch"] = 0


# ----------------------------------------------------------------------------------------------------- checkpoints
def window_record(accelerator: Accelerator, window: dict, lr_scheduler, hooks) -> dict:
    """What both scripts log for the steps since the last log: mean training loss over ranks, lr, clamp metrics."""
    record = {
        "train/loss": accelerator.reduce(window["loss"], reduction="mean").item() / window["steps"],
        "train/lr": lr_scheduler.get_last_lr()[0],
    }
    if isinstance(hooks, SpectralClampHooks):
        record.update(hooks.metrics())
    return record


def completed_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in output_dir/checkpoints, oldest first (unfinished `.partial` ones excluded)."""
    folder = output_dir / "checkpoints"
    found = [path for path in folder.glob("step_*") if CHECKPOINT_PATTERN.match(path.name)] if folder.is_dir() else []
    found = [path for path in found if (path / TRAINING_STATE).is_file()]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)))


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    output_dir: Path,
    position: dict,
    args: argparse.Namespace,
    helpers: dict,
) -> Path:
    """Save model (with POET's Q, permutations and merge counts), optimizer, scheduler, RNG, data position and the
    state of the training helpers (name → object with state_dict, e.g. the spectral monitor).

    Written to `step_N.partial` and renamed once complete, so a crash mid-save never leaves a broken checkpoint.
    The helpers go through poet_peft.save_state (safetensors + JSON), not Accelerate's register_for_checkpointing,
    whose pickles would run code from a crafted checkpoint on resume.
    """
    final = output_dir / "checkpoints" / f"step_{position['completed_steps']}"
    # A diverged model is not checkpointed: `latest` must never resume from NaN weights.
    raise_if_nonfinite(accelerator.unwrap_model(model).named_parameters(), f"to checkpoint {final.name}")
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, helper in helpers.items():
            poet_peft.save_state(helper, partial, name)
        (partial / RUN_ARGUMENTS).write_text(json.dumps(_flag_values(args), indent=2))
        (partial / TRAINING_STATE).write_text(json.dumps(position, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if args.checkpoints_total_limit:
            for old in completed_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _flag_values(args: argparse.Namespace) -> dict:
    return json.loads(json.dumps(vars(args), default=str))  # as JSON has them: paths as strings, tuples as lists


def check_resume_arguments(args: argparse.Namespace, checkpoint: Path) -> None:
    """Refuse to resume with other data, model or optimisation flags than the checkpoint's run was started with."""
    path = checkpoint / RUN_ARGUMENTS
    if not path.is_file():
        return  # written before checkpoints recorded their flags
    saved, now = json.loads(path.read_text()), _flag_values(args)
    changed = sorted(
        key for key in saved.keys() | now.keys() if key not in CHANGEABLE_ON_RESUME and saved.get(key) != now.get(key)
    )
    if changed:
        listed = "; ".join(f"--{key} {saved.get(key)!r} → {now.get(key)!r}" for key in changed)
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint}: the run it continues was started with other flags ({listed}). "
            "Resume with the same ones (only step counts, logging, checkpointing and caches may change), or "
            "start a new run in another --output_dir."
        )


def load_checkpoint(accelerator: Accelerator, output_dir: Path, checkpoint: Path, helpers: dict) -> None:
    """Restore what save_checkpoint wrote into the prepared objects and the helpers.

    Resuming from an earlier checkpoint than the run's last abandons the later ones: they move to
    checkpoints/abandoned/ (kept, never deleted), so that `latest` and --checkpoints_total_limit follow this run.
    """
    try:
        poet_peft.check_sharded_checkpoint(checkpoint)  # before Accelerate unpickles an FSDP2 checkpoint's metadata
    except ValueError as error:
        raise UsageError(str(error)) from None
    accelerator.load_state(str(checkpoint))
    for name, helper in helpers.items():
        poet_peft.load_state(helper, checkpoint, name)
    step = int(json.loads((checkpoint / TRAINING_STATE).read_text())["completed_steps"])
    later = [path for path in completed_checkpoints(output_dir) if int(path.name.removeprefix("step_")) > step]
    if accelerator.is_main_process and later:
        abandoned = output_dir / "checkpoints" / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
        abandoned.mkdir(parents=True, exist_ok=True)
        for path in later:
            os.replace(path, abandoned / path.name)
        accelerator.print(
            f"Resumed at step {step}: the later checkpoints {[p.name for p in later]} moved to {abandoned}"
        )
    accelerator.wait_for_everyone()


def resolve_checkpoint(spec: str, output_dir: Path) -> Path:
    """The checkpoint folder named by --resume_from_checkpoint: a path, or "latest" in output_dir."""
    if spec == "latest":
        found = completed_checkpoints(output_dir)
        if not found:
            raise UsageError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}/checkpoints")
        return found[-1]
    path = Path(spec)
    if not (path / TRAINING_STATE).is_file():
        raise UsageError(f"--resume_from_checkpoint {spec}: not a complete checkpoint (no {TRAINING_STATE})")
    return path


# ------------------------------------------------------------------------------------------------ step hooks
class NoStepHooks:
    """Per-step hooks for methods that need none: the clip norm as given, nothing after the step."""

    def clip_norm(self, max_norm: float, step: int) -> float:
        """The clip norm for the next optimizer step."""
        return max_norm

    def after_step(self, step: int) -> bool:
        """Nothing to do after an optimizer step."""
        return False


class SpectralClampHooks(NoStepHooks):
    """Clamp σ_max(ΔW) after every optimizer step, timing it and keeping the largest σ/bound seen before a clamp."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.seconds = 0.0
        self.steps = 0
        self.worst_ratio = 0.0

    def after_step(self, step: int) -> bool:
        """Clamp; says whether any branch was over its bound."""
        start = time.perf_counter()
        ratio = poet_peft.clamp_spectral_norms(self.model)
        self.seconds += time.perf_counter() - start
        self.steps += 1
        self.worst_ratio = max(self.worst_ratio, ratio)
        return ratio > 1

    def metrics(self) -> dict:
        """Clamp cost per step (ms) and the largest σ_max(ΔW)/bound met before clamping, since the last call."""
        record = {"train/clamp_ms": 1000 * self.seconds / max(self.steps, 1), "train/clamp_ratio_max": self.worst_ratio}
        self.seconds, self.steps, self.worst_ratio = 0.0, 0, 0.0
        return record
