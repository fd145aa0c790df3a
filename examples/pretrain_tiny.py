#!/usr/bin/env python
"""A short POET pretraining run: a tiny LLaMA trained from scratch on the bundled Shakespeare text.

It uses only public APIs: transformers.Trainer, PEFT's get_peft_model, and poet_peft's POETConfig, POETCallback
and param_groups. Offline by default; minutes on 2 CPU cores.

    python examples/pretrain_tiny.py --output_dir out/pretrain_tiny
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path

import torch
from peft import get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import poet_peft

BUNDLED_TEXT = Path(__file__).parent / "data" / "shakespeare.txt.gz"
# Everything outside the transformer-block linears trains with AdamW at the base lr, as in the paper.
TRAINED_IN_FULL = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head"]


def load_text(path: Path = BUNDLED_TEXT, max_chars: int | None = None) -> str:
    """The training text: the bundled Shakespeare (gzip) or any UTF-8 text file, optionally truncated."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.read(max_chars) if max_chars else handle.read()


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `text` (a few seconds for megabytes)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
    return tokenizer


class PackedText(torch.utils.data.Dataset):
    """Token ids packed into consecutive blocks of `block_size`, each an (input_ids, labels) example."""

    def __init__(self, ids: list[int], block_size: int):
        count = len(ids) // block_size
        self.blocks = torch.tensor(ids[: count * block_size], dtype=torch.long).view(count, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def tiny_llama(vocab_size: int, hidden: int, layers: int) -> LlamaForCausalLM:
    """A small LLaMA built from a config (no download): heads of 32 dimensions, FFN ≈ 8/3·hidden."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; every one is listed in the README."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="out/pretrain_tiny")
    parser.add_argument("--train_file", type=Path, default=BUNDLED_TEXT, help="UTF-8 text (.txt or .txt.gz)")
    parser.add_argument("--max_chars", type=int, default=None, help="use only the first N characters")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW lr of embeddings, norms and lm_head")
    parser.add_argument("--poet_lr", type=float, default=1e-2, help="AdamW lr of POET's Q parameters")
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--block", type=float, default=32, help="POET block: integer b (bs) or fraction (fs)")
    parser.add_argument("--mode", choices=["bs", "fs"], default="bs")
    parser.add_argument("--neumann_terms", type=int, default=3)
    parser.add_argument("--merge_every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "bs":
        args.block = int(args.block)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate on held-out text, save the merged model, and return the metrics."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    text = load_text(args.train_file, args.max_chars)
    split = int(len(text) * 0.95)
    tokenizer = train_tokenizer(text[:split], args.vocab_size)
    train_data = PackedText(tokenizer.encode(text[:split]).ids, args.block_size)
    eval_data = PackedText(tokenizer.encode(text[split:]).ids, args.block_size)

    config = poet_peft.POETConfig(
        block=args.block,
        mode=args.mode,
        neumann_terms=args.neumann_terms,
        merge_every=args.merge_every,
        init_weights="normalized_gaussian",
        modules_to_save=TRAINED_IN_FULL,
        seed=args.seed,
    )
    model = get_peft_model(tiny_llama(tokenizer.get_vocab_size(), args.hidden_size, args.num_layers), config)
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"trainable parameters: {trainable:,} of {total:,} "
        f"(POET Q: {sum(p.numel() for p in poet_peft.poet_parameters(model)):,})"
    )

    optimizer = torch.optim.AdamW(poet_peft.param_groups(model, args.lr, args.poet_lr, args.weight_decay), eps=1e-6)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.01},
        max_grad_norm=args.max_grad_norm,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        optimizers=(optimizer, None),
        callbacks=[poet_peft.POETCallback()],
    )
    train_output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    eval_loss = trainer.evaluate()["eval_loss"]
    metrics = {
        "merges": max(
            int(count) for layer in poet_peft.poet_layers(model) for count in layer.poet_merge_count.values()
        ),
        "first_logged_loss": losses[0],
        "last_logged_loss": losses[-1],
        "train_loss": train_output.training_loss,
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss),
    }
    print(json.dumps(metrics, indent=2))

    merged = model.merge_and_unload()
    merged.save_pretrained(Path(args.output_dir) / "merged")
    tokenizer.save(str(Path(args.output_dir) / "merged" / "tokenizer.json"))
    return metrics


if __name__ == "__main__":
    main()
