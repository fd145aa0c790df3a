#!/usr/bin/env python
"""Pretrain a LLaMA-style causal language model from scratch with AdamW, POET, ORA or spectral LoRA, under Accelerate.

In the spirit of Transformers' run_clm_no_trainer.py. With no data flags it trains on the bundled Wikipedia
summaries, offline; `--dataset_name allenai/c4 --dataset_config_name en --streaming` is the paper's setting.

    accelerate launch examples/run_clm.py                                  # tiny POET run on the bundled text
    accelerate launch examples/run_clm.py --method adamw --model_size 60m --tokenizer_name t5-base \\
        --dataset_name allenai/c4 --dataset_config_name en --streaming --max_train_steps 10000
    accelerate launch examples/run_clm.py --method ora                     # frozen random orthogonal Q/K
    accelerate launch examples/run_clm.py --method adamw --attention synthesizer_random   # ORA's baseline
    accelerate launch examples/run_clm.py --method adamw --e4 svd --target_perplexity 300  # seed 002's E4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Optional

import datasets
import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from peft import LoraConfig, PeftModel, get_peft_model
from run_utils import (
    TRAINING_STATE,
    NoStepHooks,
    SpectralClampHooks,
    UsageError,
    add_output_arguments,
    add_spec_arguments,
    check_output_dir,
    check_positive,
    check_resume_arguments,
    check_tracker,
    distribution_summary,
    engage_fsdp2_on_cpu,
    load_checkpoint,
    local_file_extension,
    optimizer_steps,
    parameter_summary,
    parse_block,
    parse_neumann_terms,
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
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
    get_scheduler,
)

import poet_peft
from poet_peft.export import EVAL_RESULTS, replace_folder
from poet_peft.guards import raise_if_nonfinite
from poet_peft.synthesizer import SYNTHESIZERS, install_synthesizer

logger = get_logger(__name__)

BUNDLED_DATA = Path(__file__).resolve().parent / "data" / "wikipedia_summaries_en.jsonl.gz"
END_OF_TEXT = "<|endoftext|>"
# The byte-level BPE is trained on at most this much of the training split (enough for an 8k-32k vocabulary).
TOKENIZER_TRAINING_CHARS = 50_000_000

# hidden / FFN / heads / layers, and the base learning rate. The paper's sizes (ANCHORS: arXiv 2506.08001, Table 2
# and appendix) plus tiny ones that train in minutes on two CPU cores.
MODEL_SIZES = {
    "nano": dict(hidden_size=64, intermediate_size=176, num_attention_heads=2, num_hidden_layers=2, lr=1e-2),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_hidden_layers=4, lr=1e-2),
    "small": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_hidden_layers=6, lr=1e-2),
    "60m": dict(hidden_size=512, intermediate_size=1280, num_attention_heads=8, num_hidden_layers=8, lr=1e-2),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12, lr=5e-3),
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_hidden_layers=24, lr=5e-3),
    "1b": dict(hidden_size=2048, intermediate_size=5376, num_attention_heads=32, num_hidden_layers=24, lr=1e-3),
}
# --recipe official: the official POET code's settings (Sphere-AI-Lab/poet at 0ac6599, the paper-era code:
# scripts/benchmark_c4_poet/pretrain_poet_60m.sh and pretrain_poet_1b_normalized.sh; its POETAdamW then scales the
# POET lr by 1). It has no POET script for 130m or 350m: those sizes, and the small ones, take 60m's settings (less
# the block size below 60m). Flags given explicitly still win. "Reproducing the official recipe" in
# docs/pretraining.md lists every difference from the default recipe.
OFFICIAL_RECIPES = {
    "60m": dict(learning_rate=1e-2, poet_lr=2e-3, block=256, max_grad_norm=0.1, num_warmup_steps=0),
    "1b": dict(learning_rate=5e-3, poet_lr=5e-4, block=512, max_grad_norm=1.0, num_warmup_steps=2000),
}
OFFICIAL_SHARED = dict(merge_every=200, weight_decay=0.0, min_lr_ratio=0.01)
OFFICIAL_CLIP_RAMP_UNTIL = 2000  # the official gd_warmup_steps: no clip ramp after merges past this step
# Outside the transformer-block linears everything trains in full with AdamW at the base lr, as in the paper.
TRAINED_IN_FULL = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head"]
BLOCK_LINEARS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# ----------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line flags; every one is listed in docs/pretraining.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", help="a Hub dataset (or a local dataset folder), e.g. allenai/c4")
    data.add_argument("--dataset_config_name", help="its configuration, e.g. en")
    data.add_argument("--streaming", action="store_true", help="stream the Hub dataset instead of downloading it")
    data.add_argument("--train_file", help="a .txt (one document per line), .json or .jsonl file, optionally .gz")
    data.add_argument("--validation_file", help="same formats; default: a split of the training data")
    data.add_argument("--text_column", default="text", help="the column holding the text (json/jsonl/Hub)")
    data.add_argument("--validation_split_percentage", type=float, default=5.0)
    data.add_argument("--max_eval_samples", type=int, help="evaluate on at most this many sequences")
    data.add_argument("--block_size", type=int, default=256, help="tokens per packed training sequence")
    data.add_argument("--tokenizer_name", help="a Hub or local tokenizer; default: a byte-level BPE trained here")
    data.add_argument("--vocab_size", type=int, default=8192, help="size of the trained byte-level BPE")
    data.add_argument("--tokenizer_cache_dir", help="where trained tokenizers are kept (default ~/.cache/poet-peft)")
    data.add_argument("--preprocessing_num_workers", type=int, help="processes for tokenization")

    model = parser.add_argument_group("model")
    model.add_argument("--model_size", choices=sorted(MODEL_SIZES, key=list(MODEL_SIZES).index), default="tiny")
    model.add_argument("--config_name", help="a model config (Hub or local) to use instead of --model_size")
    model.add_argument(
        "--config_overrides",
        help='comma-separated config fields, e.g. "num_hidden_layers=2" or "num_attention_heads=8,head_dim=16"',
    )
    model.add_argument(
        "--attention",
        choices=["default", *SYNTHESIZERS],
        default="default",
        help="Synthesizer attention replaces Q·Kᵀ by learned per-head position logits (with --method adamw)",
    )
    model.add_argument(
        "--synthesizer_fixed", action="store_true", help="freeze the Synthesizer logits at their random init"
    )
    model.add_argument("--synthesizer_factor_dim", type=int, default=16, help="rank k of synthesizer_factorized")

    method = parser.add_argument_group("method")
    method.add_argument("--method", choices=sorted(METHODS), default="poet")
    method.add_argument(
        "--recipe",
        choices=["default", "official"],
        default="default",
        help="official: the official POET code's lrs, clip, decay, warmup, its AdamW and capped clip ramp",
    )
    method.add_argument(
        "--block",
        type=parse_block,
        help="POET block: b for bs (default min(256, hidden/2)), a fraction for fs (default 1/2)",
    )
    method.add_argument("--mode", choices=["bs", "fs"], default="bs", help="POET's stochastic primitive")
    method.add_argument(
        "--neumann_terms", type=parse_neumann_terms, default=3, help='Cayley–Neumann terms k ("exact": the Cayley map)'
    )
    method.add_argument(
        "--init_weights",
        choices=["normalized_gaussian", "uniform_spectrum", "xavier", "standard"],
        default="normalized_gaussian",
        help="POET's W0: the paper's choice, a flat spectrum, Xavier, or the model's own init (its Table 5)",
    )
    method.add_argument(
        "--merge_every",
        type=int,
        default=poet_peft.POETConfig.merge_every,
        help="POET merge-then-reinitialize period T_m",
    )
    method.add_argument("--poet_lr", type=float, help="lr of POET's Q (default: the paper's 1e-3·256/b, 1e-3·(1/2)/f)")
    method.add_argument(
        "--memory_mode",
        choices=["recompute", "store"],
        default="recompute",
        help="POET: save only each layer's input and recompute the rotations in the backward, or store them",
    )
    method.add_argument(
        "--base_dtype", choices=["float32", "bfloat16", "float16"], help="POET: store W0 in this dtype (default: fp32)"
    )
    method.add_argument(
        "--ora_init", choices=["orthogonal", "gaussian"], default="orthogonal", help="ORA's Q/K draw (A1: gaussian)"
    )
    method.add_argument("--ora_trainable_qk", action="store_true", help="train ORA's Q/K from the draw (A2)")
    method.add_argument("--lora_r", type=int, default=8, help="LoRA and spectral LoRA rank r")
    method.add_argument("--lora_alpha", type=float, default=8.0, help="LoRA scale: the branch is × alpha/r")
    method.add_argument("--lora_magnitude", choices=["scalar", "vector"], default="scalar", help="m per layer or row")
    method.add_argument(
        "--lora_sigma_max", type=parse_sigma_max, default=0.7, help='clamp c: σ_max(ΔW) ≤ c/√d_in ("none": off)'
    )
    method.add_argument(
        "--lora_backbone",
        choices=["pretrained", "frozen_random", "zero"],
        default="frozen_random",
        help="W beside the branch: the model's own init frozen, redrawn N(0, 1/d_in) and frozen (#1), or 0 (#2)",
    )
    method.add_argument("--magnitude_lr_ratio", type=float, default=10.0, help="lr × this for the magnitudes m")
    method.add_argument("--galore_rank", type=int, help="GaLore's projection rank (default: hidden/4, as its paper)")
    method.add_argument("--galore_update_proj_gap", type=int, default=200, help="GaLore: steps between projections")
    method.add_argument("--galore_scale", type=float, default=0.25, help="GaLore's update scale α")

    e4 = parser.add_argument_group("E4 and stable directions (seed 002, with --method adamw)")
    e4.add_argument(
        "--e4",
        choices=["none", "svd", "random", "global"],
        default="none",
        help="after --e4_warmup_steps: svd = E4 split W = R + U·C·Vᵀ, random = B2 (random U, V), global = B1 "
        "(the targets' whole lr × --e4_lr_ratio), none = B0",
    )
    e4.add_argument("--e4_warmup_steps", type=int, default=100, help="optimizer steps before the split (or B1's lr)")
    e4.add_argument("--e4_rank", type=int, default=8, help="k of the split")
    e4.add_argument("--e4_lr_ratio", type=float, default=10.0, help="lr × this for C (svd, random) or the targets")
    e4.add_argument(
        "--principal_targets", default=BLOCK_LINEARS, help="comma-separated Linear names for --e4 and --track_*"
    )
    e4.add_argument(
        "--track_directions_every", type=int, default=0, help="top-k SVD of the targets' Adam momentum every N steps"
    )
    e4.add_argument("--track_topk", type=int, default=8, help="k of the tracked subspace")
    e4.add_argument(
        "--track_amplify", type=float, default=1.0, help="variant 3B: the lr inside the tracked subspace × this"
    )

    train = parser.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=int, default=8)
    train.add_argument("--per_device_eval_batch_size", type=int, default=8)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, help="base lr (default: the paper's for the size)")
    train.add_argument(
        "--block_lr",
        type=float,
        help="lr of the transformer-block weight matrices alone (adamw, muon, galore; as POET's --poet_lr is Q's)",
    )
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clip (POET ramps it after merges)")
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, help="optimizer steps; overrides --num_train_epochs")
    train.add_argument("--num_warmup_steps", type=int, default=0)
    train.add_argument("--min_lr_ratio", type=float, default=0.01, help="the cosine schedule ends at lr × this")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--num_threads", type=int, help="CPU threads per process (default: the machine's cores over its processes)"
    )
    train.add_argument(
        "--target_perplexity", type=float, help="report time-to-X: steps, tokens and seconds to this validation ppl"
    )

    add_spec_arguments(
        parser,
        BLOCK_LINEARS,
        "decompose the effective weight, its gradient, or its Adam momentum (these two with --method adamw)",
    )
    output = add_output_arguments(parser, "out/run_clm")
    output.add_argument("--logging_steps", type=int, default=10)
    output.add_argument("--eval_steps", type=int, default=200, help="validate every N steps (and at the end)")
    known, _ = parser.parse_known_args(argv)
    if known.recipe == "official":
        parser.set_defaults(**official_recipe(known.model_size))
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def official_recipe(model_size: str) -> dict:
    """The flags --recipe official sets for a model size (see OFFICIAL_RECIPES)."""
    recipe = {**OFFICIAL_RECIPES.get(model_size, OFFICIAL_RECIPES["60m"]), **OFFICIAL_SHARED}
    if model_size not in ("60m", "130m", "350m", "1b"):
        del recipe["block"]  # b=256 needs hidden ≥ 512: the small sizes keep their default block
    return recipe


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot work, naming the flags and what would."""
    if args.dataset_name and args.train_file:
        parser.error("pass either --dataset_name or --train_file, not both")
    if args.block_lr is not None and args.method not in ("adamw", "muon", "galore"):
        parser.error(
            f"--block_lr sets the lr of the block weights that adamw, muon and galore train, not {args.method}'s"
        )
    if args.recipe == "official" and args.method != "poet":
        parser.error("--recipe official is the official POET code's recipe: use it with --method poet")
    if args.validation_file and not args.train_file:
        parser.error("--validation_file needs --train_file")
    if args.streaming and not args.dataset_name:
        parser.error("--streaming applies to --dataset_name only")
    if args.streaming and args.max_train_steps is None:
        parser.error("a streamed dataset has no length: pass --max_train_steps")
    check_positive(
        parser,
        args,
        [
            "block_size",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_train_epochs",
            "logging_steps",
            "eval_steps",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "max_train_steps",
            "merge_every",
            "synthesizer_factor_dim",
            "lora_r",
            "galore_rank",
            "galore_update_proj_gap",
            "e4_warmup_steps",
            "e4_rank",
            "track_topk",
            "spec_every",
            "spec_topk",
        ],
    )
    if not 0 < args.validation_split_percentage < 100:
        parser.error(f"--validation_split_percentage {args.validation_split_percentage}: use a value in (0, 100)")
    if args.block is not None and (args.mode == "fs") != isinstance(args.block, float):
        parser.error(
            f"--block {args.block} does not fit --mode {args.mode}: bs takes an integer b ≥ 2, fs a fraction in (0, 1]"
        )
    if args.attention != "default" and args.method != "adamw":
        parser.error(
            f"--attention {args.attention} removes Q and K, which --method {args.method} needs: use --method adamw"
        )
    if args.synthesizer_fixed and args.attention == "default":
        parser.error("--synthesizer_fixed applies to --attention synthesizer_random or synthesizer_factorized")
    if (args.e4 != "none" or args.track_directions_every) and args.method != "adamw":
        parser.error("--e4 and --track_directions_every act on the plain model's Linear layers: use --method adamw")
    if args.track_directions_every < 0 or args.track_amplify <= 0:
        parser.error("--track_directions_every takes N ≥ 0 (0: off) and --track_amplify a factor > 0")
    if args.track_amplify != 1.0 and not args.track_directions_every:
        parser.error("--track_amplify (variant 3B) needs --track_directions_every N to find the subspace")
    if args.spec_source != "weight" and (args.method != "adamw" or args.e4 in ("svd", "random")):
        parser.error(
            f"--spec-source {args.spec_source} reads the targets' own weights, which --method {args.method} freezes "
            "and --e4 svd/random splits: use --spec-source weight, or --method adamw without the split"
        )
    for name in ("e4_lr_ratio", "magnitude_lr_ratio", "lora_alpha", "max_grad_norm", "learning_rate", "poet_lr"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{name} {value}: use a finite value > 0")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight_decay {args.weight_decay}: use a finite value ≥ 0")
    if not 0 <= args.min_lr_ratio <= 1:
        parser.error(f"--min_lr_ratio {args.min_lr_ratio}: the schedule ends at lr × this, use a value in [0, 1]")


# ---------------------------------------------------------------------------------------------------------- data
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json"}


def data_files_builder(path: str) -> str:
    """The `datasets` builder for a local file: text for .txt, json for .json/.jsonl (also compressed)."""
    return BUILDERS[local_file_extension(path, tuple(BUILDERS))]


def load_raw_splits(args: argparse.Namespace) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training and validation documents, from the Hub, local files, or the bundled default."""
    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming)
    else:
        train_file = args.train_file or str(BUNDLED_DATA)
        files = {"train": train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        builders = {data_files_builder(path) for path in files.values()}
        empty = [
            f"--{split}_file {path}"
            for split, path in files.items()
            if Path(path).is_file() and not Path(path).stat().st_size
        ]
        if empty:
            raise UsageError(f"{' and '.join(empty)} is empty: give a file with text in it.")
        if len(builders) > 1:
            raise UsageError("--train_file and --validation_file must have the same format (.txt, or .json/.jsonl)")
        raw = datasets.load_dataset(builders.pop(), data_files=files)
    train = raw["train"]
    if "validation" in raw:
        validation = raw["validation"]
    elif args.streaming:
        # A stream has no length: hold out its first documents, as many as the percentage of 10,000.
        held_out = max(1, round(100 * args.validation_split_percentage))
        train, validation = train.skip(held_out), train.take(held_out)
    else:
        # A fixed split seed, not --seed: runs with different seeds are validated on the same documents.
        split = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=0)
        train, validation = split["train"], split["test"]
    if args.text_column not in (train.column_names or [args.text_column]):
        raise UsageError(f"--text_column {args.text_column!r} is not in the data; its columns: {train.column_names}")
    return train, validation


def data_identity(args: argparse.Namespace) -> str:
    """What the training split depends on: the dataset name or the file contents, and the split settings."""
    if args.dataset_name:
        source = f"hub:{args.dataset_name}:{args.dataset_config_name}:{args.streaming}"
    else:
        source = "file:" + hashlib.sha256(Path(args.train_file or BUNDLED_DATA).read_bytes()).hexdigest()
    held_out = "file" if args.validation_file else args.validation_split_percentage
    return f"{source}|{args.text_column}|{held_out}"


def train_bpe_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with `<|endoftext|>` as its only special token, trained on an iterable of texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT)


def limited_texts(split, column: str, max_chars: int):
    """The texts of a split, stopping once `max_chars` characters have been given."""
    given = 0
    for row in split:
        if given >= max_chars:
            return
        given += len(row[column])
        yield row[column]


def load_tokenizer(args: argparse.Namespace, train: datasets.Dataset):
    """`--tokenizer_name`, or a byte-level BPE trained once on the training split and cached on disk."""
    if args.tokenizer_name:
        return AutoTokenizer.from_pretrained(args.tokenizer_name)
    cache_root = Path(args.tokenizer_cache_dir or Path.home() / ".cache" / "poet-peft" / "tokenizers")
    key = hashlib.sha256(f"{data_identity(args)}|{args.vocab_size}|bpe-v1".encode()).hexdigest()[:16]
    cached = cache_root / f"bpe-{args.vocab_size}-{key}"
    with PartialState().main_process_first():
        if not (cached / "tokenizer.json").is_file():
            logger.info(f"Training a byte-level BPE tokenizer ({args.vocab_size} tokens); caching it in {cached}")
            tokenizer = train_bpe_tokenizer(
                limited_texts(train, args.text_column, TOKENIZER_TRAINING_CHARS), args.vocab_size
            )
            partial = cached.with_name(f"{cached.name}.partial-{os.getpid()}")
            tokenizer.save_pretrained(partial)
            cached.parent.mkdir(parents=True, exist_ok=True)
            if not (cached / "tokenizer.json").is_file():
                os.replace(partial, cached)
            shutil.rmtree(partial, ignore_errors=True)
        # transformers 5 builds empty tokenizers from loose vocabulary files: load the saved folder instead.
        return AutoTokenizer.from_pretrained(cached)


def tokenize_and_pack(split, tokenizer, args: argparse.Namespace, name: str):
    """Token ids of every document, each followed by the end-of-text token, packed into `block_size` sequences."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    column, block_size = args.text_column, args.block_size  # the closures capture only these (datasets' cache key)

    def tokenize(batch):
        ids = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [document + separator for document in ids]}

    def pack(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        total = len(ids) // block_size * block_size
        blocks = [ids[start : start + block_size] for start in range(0, total, block_size)]
        return {"input_ids": blocks}

    streamed = isinstance(split, datasets.IterableDataset)

    def options(description: str) -> dict:
        return {} if streamed else {"num_proc": args.preprocessing_num_workers, "desc": description}

    with PartialState().main_process_first():
        tokenized = split.map(
            tokenize, batched=True, remove_columns=split.column_names, **options(f"Tokenizing {name}")
        )
        packed = tokenized.map(pack, batched=True, **options(f"Packing {name} into {block_size}-token sequences"))
    if not streamed and len(packed) == 0:
        tokens = sum(len(ids) for ids in tokenized["input_ids"])
        raise UsageError(
            f"{name} holds {tokens} tokens, not enough for one sequence of --block_size {block_size}: give more text "
            "or a smaller --block_size."
        )
    return packed


def collate_packed(examples: list[dict]) -> dict[str, torch.Tensor]:
    """A batch of packed sequences; the labels are the inputs themselves (the model shifts them)."""
    input_ids = torch.stack([torch.as_tensor(example["input_ids"]) for example in examples])
    return {"input_ids": input_ids, "labels": input_ids}


# --------------------------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, tokenizer) -> torch.nn.Module:
    """A LLaMA-style model from --model_size (or --config_name), --config_overrides and --attention, untrained."""
    if args.config_name:
        config = AutoConfig.from_pretrained(args.config_name)
    else:
        shape = {key: value for key, value in MODEL_SIZES[args.model_size].items() if key != "lr"}
        config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], tie_word_embeddings=False)
    config.vocab_size = len(tokenizer)
    config.max_position_embeddings = max(args.block_size, getattr(config, "max_position_embeddings", 0) or 0)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
        overridden = {item.partition("=")[0].strip() for item in args.config_overrides.split(",")}
        # A different head count keeps d_model (ablation A3): d_k and the key/value heads follow unless also given.
        if "num_attention_heads" in overridden:
            if "head_dim" not in overridden and hasattr(config, "head_dim"):
                config.head_dim = config.hidden_size // config.num_attention_heads
            if "num_key_value_heads" not in overridden and hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = config.num_attention_heads
    model = AutoModelForCausalLM.from_config(config)
    if args.attention != "default":
        install_synthesizer(
            model, args.attention, args.block_size, args.synthesizer_fixed, args.synthesizer_factor_dim, args.seed
        )
    return model


def base_learning_rate(args: argparse.Namespace) -> float:
    """--learning_rate, or the paper's base lr for the model size."""
    if args.learning_rate is not None:
        return args.learning_rate
    return MODEL_SIZES[args.model_size]["lr"] if not args.config_name else 1e-3


def adamw_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """run_clm.py's AdamW: betas (0.9, 0.999), eps 1e-6."""
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-6)


@dataclass
class Method:
    """A training method: how it wraps the model, its optimizer groups and optimizer, and its per-step hooks."""

    wrap: Callable[[torch.nn.Module, argparse.Namespace], torch.nn.Module]
    param_groups: Callable[[torch.nn.Module, argparse.Namespace], list[dict]]
    step_hooks: Callable[[torch.nn.Module, torch.optim.Optimizer], object]
    optimizer: Callable[[list[dict]], torch.optim.Optimizer] = adamw_optimizer


def param_groups(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """poet_peft's groups: matrices decayed, vectors not, POET's Q and spectral-LoRA magnitudes at their own lr."""
    poet_lr = poet_learning_rate(args, args.block) if args.method == "poet" else None
    return poet_peft.create_param_groups(
        model, base_learning_rate(args), args.weight_decay, args.magnitude_lr_ratio, poet_lr, args.e4_lr_ratio
    )


def poet_block(args: argparse.Namespace, model: torch.nn.Module) -> float:
    """--block, or the default: min(256, hidden/2) for bs, 1/2 for fs."""
    if args.block is not None:
        return args.block
    return 0.5 if args.mode == "fs" else min(256, model.config.hidden_size // 2)


def poet_learning_rate(args: argparse.Namespace, block: float) -> float:
    """--poet_lr, or the paper's: 1e-3 at b=256 (or f=1/2), doubling each time the block halves."""
    if args.poet_lr is not None:
        return args.poet_lr
    return 1e-3 * (256 / block if args.mode == "bs" else 0.5 / block)


def wrap_poet(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """POET as in the paper: W0 from --init_weights, every transformer-block linear wrapped, the rest trained."""
    args.block = poet_block(args, model)
    config = poet_peft.POETConfig(
        block=args.block,
        mode=args.mode,
        neumann_terms=args.neumann_terms,
        merge_every=args.merge_every,
        memory_mode=args.memory_mode,
        base_dtype=args.base_dtype,
        init_weights=None if args.init_weights == "standard" else args.init_weights,
        train_in_place=TRAINED_IN_FULL,
        seed=args.seed,
    )
    return get_peft_model(model, config)


def wrap_ora(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """ORA: Q and K drawn from --seed and frozen (or trained, --ora_trainable_qk); everything else trains."""
    config = poet_peft.ORAConfig(init=args.ora_init, trainable_qk=args.ora_trainable_qk, seed=args.seed)
    return get_peft_model(model, config)


def wrap_spectral_lora(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """Spectral LoRA on every transformer-block linear beside a frozen backbone; the rest trains in full."""
    config = poet_peft.SpectralLoRAConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        magnitude=args.lora_magnitude,
        sigma_max=args.lora_sigma_max,
        backbone=args.lora_backbone,
        train_in_place=TRAINED_IN_FULL,
        seed=args.seed,
    )
    return get_peft_model(model, config)


def wrap_lora(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """PEFT's LoRA of rank --lora_r on every transformer-block linear, beside the frozen initial weights."""
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules=BLOCK_LINEARS.split(","),
        modules_to_save=TRAINED_IN_FULL,
    )
    return get_peft_model(model, config)


def block_weights_apart(model: torch.nn.Module, args: argparse.Namespace, name: str, **settings) -> list[dict]:
    """The usual groups, with the transformer-block weights moved to a group `name` holding `settings` (the
    baselines' optimizers treat those matrices their own way)."""
    moved = {id(linear.weight) for _, linear in poet_peft.matching_linears(model, BLOCK_LINEARS.split(","))}
    groups = param_groups(model, args)
    matrices = next(group for group in groups if group["name"] == "matrices")
    matrices["params"] = [p for p in matrices["params"] if id(p) not in moved]
    apart = {
        "name": name,
        "params": [p for p in model.parameters() if id(p) in moved],
        "lr": matrices["lr"] if args.block_lr is None else args.block_lr,
        "weight_decay": matrices["weight_decay"],
        **settings,
    }
    return [group for group in [*groups, apart] if group["params"]]


def adamw_param_groups(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """The usual groups; with --block_lr, the transformer-block weights in a group of their own at that lr."""
    return param_groups(model, args) if args.block_lr is None else block_weights_apart(model, args, "block_matrices")


def galore_param_groups(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """The usual groups, with the transformer-block weights in a group GaLore projects (its paper's targets)."""
    rank = args.galore_rank or model.config.hidden_size // 4
    settings = dict(rank=rank, update_proj_gap=args.galore_update_proj_gap, scale=args.galore_scale, proj_type="std")
    return block_weights_apart(model, args, "galore", **settings)


def galore_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """galore-torch's GaLoreAdamW (Adam's moments kept in the projected space of each projected weight)."""
    try:
        from galore_torch import GaLoreAdamW
        from galore_torch.galore_projector import GaLoreProjector
    except ImportError as error:
        raise SystemExit(
            f"--method galore needs the galore-torch package ({error}): pip install galore-torch, or install "
            "poet-peft with its [bench] extra"
        ) from error
    # Its optimizer state holds a GaLoreProjector per weight; checkpoints load with torch's weights-only unpickler.
    torch.serialization.add_safe_globals([GaLoreProjector])
    return GaLoreAdamW(groups, betas=(0.9, 0.999), eps=1e-6, no_deprecation_warning=True)


def muon_param_groups(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """The usual groups, with the transformer-block weights in a group Muon updates (the rest stay AdamW's)."""
    return block_weights_apart(model, args, "muon", muon=True)


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the groups marked `muon`, AdamW on the others, as one optimizer for Accelerate.

    Muon scales each update to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`), so one lr serves both. Both inner
    optimizers work on this optimizer's own group dicts and state, so the lr scheduler, state_dict and checkpoints
    see one ordinary optimizer.
    """

    def __init__(self, groups: list[dict]):
        super().__init__(groups, {})
        self._bind_inner_optimizers()

    def _bind_inner_optimizers(self) -> None:
        """Build Muon and AdamW over this optimizer's groups, sharing its group dicts and its state."""
        muon = [group for group in self.param_groups if group.get("muon")]
        rest = [group for group in self.param_groups if not group.get("muon")]
        self.inner = []
        for kind, groups in ((muon_optimizer, muon), (adamw_optimizer, rest)):
            if not groups:
                continue
            inner = kind(groups)
            for own, filled in zip(groups, inner.param_groups):  # take the inner optimizer's defaults into ours
                own.update({key: value for key, value in filled.items() if key not in own})
            inner.param_groups, inner.state = groups, self.state
            self.inner.append(inner)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as torch.optim.Optimizer does (which rebuilds the group dicts), then rebind the inner optimizers."""
        super().load_state_dict(state_dict)
        self._bind_inner_optimizers()

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step on its groups and one AdamW step on the rest; returns closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self.inner:
            inner.step()
        return loss


def muon_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """torch.optim.Muon with its default momentum 0.95 and Nesterov, its lr matched to AdamW's update RMS."""
    return torch.optim.Muon(groups, adjust_lr_fn="match_rms_adamw")


METHODS = {
    "adamw": Method(
        wrap=lambda model, args: model, param_groups=adamw_param_groups, step_hooks=lambda m, o: NoStepHooks()
    ),
    "lora": Method(wrap=wrap_lora, param_groups=param_groups, step_hooks=lambda m, o: NoStepHooks()),
    "galore": Method(
        wrap=lambda model, args: model,
        param_groups=galore_param_groups,
        step_hooks=lambda m, o: NoStepHooks(),
        optimizer=galore_optimizer,
    ),
    "muon": Method(
        wrap=lambda model, args: model,
        param_groups=muon_param_groups,
        step_hooks=lambda m, o: NoStepHooks(),
        optimizer=MuonWithAdamW,
    ),
    "poet": Method(wrap=wrap_poet, param_groups=param_groups, step_hooks=poet_peft.MergeSchedule),
    "ora": Method(wrap=wrap_ora, param_groups=param_groups, step_hooks=lambda m, o: NoStepHooks()),
    "spectral_lora": Method(wrap=wrap_spectral_lora, param_groups=param_groups, step_hooks=SpectralClampHooks),
}


# The baselines whose optimizers need what FSDP shards, and why.
NOT_UNDER_FSDP = {
    "galore": "its optimizer state holds GaLoreProjector objects, which torch.distributed's optimizer state dict "
    "cannot gather for checkpoints",
    "muon": "Muon orthogonalizes each weight's whole gradient, and FSDP gives each process a shard of it",
}


class PrincipalSwitch:
    """Seed 002's E4 and its controls, once --e4_warmup_steps optimizer steps are done.

    svd (E4) and random (B2) split every target W into R + U·C·Vᵀ and give the cores C the lr × --e4_lr_ratio;
    global (B1) gives the targets' whole weights that lr instead; none (B0) does nothing.
    """

    def __init__(self, args: argparse.Namespace, model, optimizer, lr_scheduler):
        self.args, self.model, self.optimizer, self.lr_scheduler = args, model, optimizer, lr_scheduler
        self.targets = args.principal_targets.split(",")

    def due(self, step: int) -> bool:
        """Whether the switch happens right after optimizer step `step`."""
        return self.args.e4 != "none" and step == self.args.e4_warmup_steps

    def apply(self) -> dict:
        """Split or re-weight the targets now; returns what to log."""
        args, lr = self.args, base_learning_rate(self.args) * self.args.e4_lr_ratio
        if args.e4 == "global":
            weights = [linear.weight for _, linear in poet_peft.matching_linears(self.model, self.targets)]
            group = {"name": "e4_global", "params": weights, "lr": lr, "weight_decay": args.weight_decay}
        else:
            poet_peft.extract_principal(self.model, args.e4_rank, self.targets, args.e4, args.seed, self.optimizer)
            cores = poet_peft.principal_cores(self.model)
            group = {"name": "principal_core", "params": cores, "lr": lr, "weight_decay": 0.0}
        poet_peft.add_param_group(self.optimizer, group, self.lr_scheduler)
        return {"e4/switched_layers": len(group["params"]), "e4/lr": self.optimizer.param_groups[-1]["lr"]}


# -------------------------------------------------------------------------------------------------------- saving
def save_merged_model(model: torch.nn.Module, state_dict: dict, tokenizer, destination: Path, record: dict) -> None:
    """Fold any adapter into the weights and save a plain Transformers model (safetensors), its tokenizer and
    `record` (how it was trained and what it measured, which `poet-peft export` puts on the model card).

    `state_dict` is the full one Accelerate gathers (under FSDP no rank holds it otherwise); PEFT models are saved
    from their merged modules instead.
    """
    if isinstance(model, PeftModel):
        model, state_dict = model.merge_and_unload(), None  # merge_and_unload refuses NaN or inf weights itself
    else:
        raise_if_nonfinite(state_dict.items(), f"to save the model to {destination}")
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, state_dict=state_dict)
    tokenizer.save_pretrained(partial)
    (partial / EVAL_RESULTS).write_text(json.dumps(record, indent=2, default=sorted))  # sets (target_modules) as lists
    replace_folder(partial, destination)


def whole_copy(args: argparse.Namespace, tokenizer, state_dict: dict) -> torch.nn.Module:
    """The trained model rebuilt unsharded in this process from the full `state_dict` gathered under FSDP."""
    model = METHODS[args.method].wrap(build_model(args, tokenizer), args)
    model.load_state_dict(state_dict)
    return model


def training_record(args: argparse.Namespace, model: torch.nn.Module, summary: dict) -> dict:
    """What the model card says about the run: the method and its config, the data, the validation metrics."""
    method = {"poet": "POET", "ora": "ORA", "spectral_lora": "spectral LoRA", "lora": "LoRA", "galore": "GaLore"}
    peft_config = model.peft_config["default"].to_dict() if isinstance(model, PeftModel) else {}
    data = args.dataset_name or Path(args.train_file or BUNDLED_DATA).name
    dataset = {"name": data, "split": "validation"}
    if args.dataset_name:
        dataset.update(id=args.dataset_name, config=args.dataset_config_name)
    metrics = {key.removeprefix("eval/"): summary[key] for key in ("eval/loss", "eval/perplexity") if key in summary}
    hyperparameters = {
        key: getattr(args, key)
        for key in ("model_size", "block_size", "per_device_train_batch_size", "learning_rate", "max_train_steps")
    }
    return {
        "task_type": "CAUSAL_LM",
        "method": method.get(args.method, "AdamW"),
        "training": "pretrained from scratch",
        "dataset": dataset,
        "metrics": metrics,
        "hyperparameters": {**hyperparameters, "tokens": summary.get("tokens"), **peft_config},
    }


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator) -> dict:
    """Validation loss (mean per token over sequences of equal length) and perplexity."""
    model.eval()
    losses = []
    for batch in dataloader:
        loss = model(**batch).loss
        losses.append(accelerator.gather_for_metrics(loss.repeat(batch["input_ids"].shape[0])))
    model.train()
    eval_loss = torch.cat(losses).float().mean().item()
    return {"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 700))}


# ------------------------------------------------------------------------------------------------------ training
def train(args: argparse.Namespace) -> dict:
    """Build data, tokenizer and model, train with the chosen method, validate, and return the run's objects."""
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
    engage_fsdp2_on_cpu(accelerator)
    if args.method != "adamw" and accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise UsageError(
            f"--method {args.method} runs under FSDP2 only (fsdp_version: 2, as in examples/configs/fsdp2.yaml): "
            "FSDP1's flat parameters hide the whole W0 and Q that merges rewrite. Or use DDP "
            "(examples/configs/multi_gpu.yaml)."
        )
    if args.method in NOT_UNDER_FSDP and accelerator.distributed_type == DistributedType.FSDP:
        raise UsageError(
            f"--method {args.method} does not run under FSDP: {NOT_UNDER_FSDP[args.method]}. Use DDP "
            "(examples/configs/multi_gpu.yaml) or one process."
        )
    whole_matrices = args.e4 != "none" or args.track_directions_every or args.spec_monitor
    if whole_matrices and accelerator.distributed_type == DistributedType.FSDP:
        raise UsageError(
            "--e4, --track_directions_every and --spec-monitor work on whole weight matrices, which FSDP shards: "
            "use DDP or one process."
        )
    if args.e4 in ("svd", "random") and accelerator.num_processes > 1:
        raise ValueError(
            f"--e4 {args.e4} adds parameters mid-run, which DDP cannot take on: run it in one process, or use "
            "--e4 global (B1)."
        )
    # This script's messages at INFO; the libraries' (Accelerate logs every file it saves) only from WARNING.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger(__name__).setLevel(logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
    previous_run = check_output_dir(args, ("metrics.jsonl", "checkpoints", "model"))
    set_seed(args.seed)

    raw_train, raw_validation = load_raw_splits(args)
    tokenizer = load_tokenizer(args, raw_train)
    train_data = tokenize_and_pack(raw_train, tokenizer, args, "the training split")
    eval_data = tokenize_and_pack(raw_validation, tokenizer, args, "the validation split")
    if args.streaming:
        train_data = train_data.with_format("torch")
        eval_data = eval_data.take(args.max_eval_samples or 1000).with_format("torch")
    elif args.max_eval_samples:
        eval_data = eval_data.select(range(min(args.max_eval_samples, len(eval_data))))
    train_loader = torch.utils.data.DataLoader(
        train_data,
        shuffle=not args.streaming,
        collate_fn=collate_packed,
        batch_size=args.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(args.seed),  # not the global RNG, which checkpoints restore
    )
    eval_loader = torch.utils.data.DataLoader(
        eval_data, collate_fn=collate_packed, batch_size=args.per_device_eval_batch_size
    )

    method = METHODS[args.method]
    model = method.wrap(build_model(args, tokenizer), args)
    accelerator.print(
        f"{parameter_summary(model)}; {threads} CPU threads per process; {distribution_summary(accelerator)}"
    )
    groups = method.param_groups(model, args)
    if args.recipe == "official":
        optimizer = poet_peft.OfficialAdamW(groups, betas=(0.9, 0.999), eps=1e-6)
        settings = ", ".join(f"--{key} {getattr(args, key)}" for key in official_recipe(args.model_size))
        accelerator.print(
            f"recipe official: {settings}; OfficialAdamW; clip ramp until step {OFFICIAL_CLIP_RAMP_UNTIL}"
        )
    else:
        optimizer = method.optimizer(groups)

    batches_per_epoch = None if args.streaming else math.ceil(len(train_loader) / accelerator.num_processes)
    max_train_steps = args.max_train_steps or args.num_train_epochs * math.ceil(
        batches_per_epoch / args.gradient_accumulation_steps
    )
    # Accelerate steps a prepared scheduler once per process for every optimizer step.
    lr_scheduler = get_scheduler(
        "cosine_with_min_lr",
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        scheduler_specific_kwargs={"min_lr_rate": args.min_lr_ratio},
    )
    start_output_dir(output_dir, previous_run)  # every input is validated: only now delete what an old run left
    model, optimizer, train_loader, eval_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, lr_scheduler
    )
    hooks = method.step_hooks(model, optimizer)
    if args.recipe == "official":
        hooks.clip_ramp_until = OFFICIAL_CLIP_RAMP_UNTIL
    plain_model = accelerator.unwrap_model(model)
    switch = PrincipalSwitch(args, plain_model, optimizer, lr_scheduler)
    directions, helpers = None, {}  # objects whose state checkpoints carry beside Accelerate's
    if args.track_directions_every:
        directions = poet_peft.StableDirections(
            plain_model,
            optimizer,
            switch.targets,
            args.track_topk,
            args.track_directions_every,
            args.track_amplify,
        )
        helpers["stable_directions"] = directions  # its subspaces, so that 3B resumes exactly
    monitor = None
    if args.spec_monitor:
        monitor = poet_peft.SpectralMonitor(args.spec_targets, args.spec_every, args.spec_topk, args.spec_source)
        monitor.bind(plain_model, optimizer)
        helpers["spectral_monitor"] = monitor  # the start's spectra and the last subspaces

    position = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "tokens": 0, "train_seconds": 0.0}
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        check_resume_arguments(args, checkpoint)
        accelerator.print(f"Resuming from {checkpoint}")
        position = {**position, **json.loads((checkpoint / TRAINING_STATE).read_text())}
        if args.e4 != "none" and position["completed_steps"] >= args.e4_warmup_steps:
            switch.apply()  # the checkpoint holds the switched model and optimizer: rebuild their shape first
            if monitor is not None:
                monitor.bind(plain_model, optimizer)
        load_checkpoint(accelerator, output_dir, checkpoint, helpers)
    resume_step = position["completed_steps"] if args.resume_from_checkpoint else None
    metrics_log = poet_peft.MetricsLog(accelerator, output_dir / "metrics.jsonl", resume_step)
    if args.report_to != "none":
        config = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("run_clm", config=config)

    tokens_per_step = (
        args.per_device_train_batch_size
        * args.block_size
        * args.gradient_accumulation_steps
        * accelerator.num_processes
    )
    accelerator.print(
        f"Training {max_train_steps} steps of {tokens_per_step:,} tokens ({args.method}); "
        f"metrics in {output_dir / 'metrics.jsonl'}"
    )
    progress = tqdm(
        total=max_train_steps,
        initial=position["completed_steps"],
        disable=not accelerator.is_local_main_process,
        desc=f"{args.method} training",
        dynamic_ncols=True,
    )
    window = {"loss": torch.zeros((), device=accelerator.device), "steps": 0, "seconds": 0.0}
    train_seconds, session_tokens, last_eval = 0.0, 0, None
    steps = optimizer_steps(
        accelerator, model, train_loader, optimizer, lr_scheduler, hooks, monitor, metrics_log, position,
        max_train_steps, args.max_grad_norm,
    )  # fmt: skip
    for step, step_loss, step_start in steps:
        window["loss"] += step_loss
        position["tokens"] += tokens_per_step
        if switch.due(step):
            metrics_log.log(switch.apply(), step)
            if monitor is not None:
                monitor.bind(plain_model, optimizer)  # the split layers are new modules
        if directions is not None:
            measured = directions.after_step(step)
            if measured:
                metrics_log.log({**measured, **poet_peft.summarize_directions(measured)}, step)
        seconds = time.perf_counter() - step_start
        window["steps"] += 1
        window["seconds"] += seconds
        train_seconds += seconds
        position["train_seconds"] += seconds
        session_tokens += tokens_per_step
        progress.update(1)

        if step % args.logging_steps == 0 or step == max_train_steps:
            record = {
                **window_record(accelerator, window, lr_scheduler, hooks),
                "train/tokens": position["tokens"],
                "train/tokens_per_second": window["steps"] * tokens_per_step / window["seconds"],
            }
            metrics_log.log(record, step)
            progress.set_postfix(loss=f"{record['train/loss']:.3f}", tok_s=f"{record['train/tokens_per_second']:,.0f}")
            window = {"loss": window["loss"].zero_(), "steps": 0, "seconds": 0.0}
        if step % args.eval_steps == 0 or step == max_train_steps:
            last_eval = evaluate(model, eval_loader, accelerator)
            metrics_log.log(last_eval, step)
            reached = args.target_perplexity and last_eval["eval/perplexity"] <= args.target_perplexity
            if reached and "time_to_target" not in position:
                position["time_to_target"] = {
                    "time_to_target/steps": step,
                    "time_to_target/tokens": position["tokens"],
                    "time_to_target/seconds": position["train_seconds"],
                }
                metrics_log.log(position["time_to_target"], step)
            if accelerator.is_local_main_process:
                progress.write(
                    f"step {step}: validation loss {last_eval['eval/loss']:.4f}, "
                    f"perplexity {last_eval['eval/perplexity']:.2f}"
                )
        if step == max_train_steps or (args.checkpointing_steps and step % args.checkpointing_steps == 0):
            save_checkpoint(accelerator, model, output_dir, position, args, helpers)
    progress.close()
    summary = {**(last_eval or {}), "steps": position["completed_steps"], "tokens": position["tokens"]}
    summary["cpu_threads_per_process"] = threads
    if args.target_perplexity:  # None where the target was not reached
        summary.update(position.get("time_to_target", {"time_to_target/steps": None}))
    if train_seconds:
        summary["train/tokens_per_second"] = session_tokens / train_seconds
    return {
        "args": args,
        "accelerator": accelerator,
        "model": model,
        "tokenizer": tokenizer,
        "summary": summary,
        "output_dir": output_dir,
    }


def main(argv: Optional[list[str]] = None) -> dict:
    """Train, then save the merged model to <output_dir>/model; returns the final metrics."""
    run = train(parse_args(argv))
    accelerator, output_dir = run["accelerator"], run["output_dir"]
    accelerator.wait_for_everyone()
    poet_peft.fold_principal(accelerator.unwrap_model(run["model"]))  # E4's R + U·C·Vᵀ back into plain Linears
    state_dict = accelerator.get_state_dict(run["model"])  # a collective under FSDP: every rank takes part
    if accelerator.is_main_process:
        print(json.dumps(run["summary"], indent=2))
        if run["args"].attention == "default":
            model = accelerator.unwrap_model(run["model"])
            if accelerator.distributed_type == DistributedType.FSDP:  # merging shards here would wait on the others
                model = whole_copy(run["args"], run["tokenizer"], state_dict)
            record = training_record(run["args"], model, run["summary"])
            save_merged_model(model, state_dict, run["tokenizer"], output_dir / "model", record)
            print(f"Merged model and tokenizer saved to {output_dir / 'model'}")
        else:  # plain Transformers has no Synthesizer attention to load it into
            print(
                "No model exported: plain Transformers cannot load Synthesizer attention. Its weights are in the "
                "checkpoints (--checkpointing_steps)."
            )
    accelerator.end_training()
    return run["summary"]


if __name__ == "__main__":
    with usage_errors_in_one_line("run_clm.py"):
        main()
