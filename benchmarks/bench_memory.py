#!/usr/bin/env python
"""Exact memory of one training step: dense AdamW against POET in each memory mode, at the paper's model shapes.

For each method it counts, in one process and without timing anything: parameters and buffers, gradients, AdamW's
two moments, and the tensors autograd saves for the backward that are not parameter or buffer storage
(`torch.autograd.graph.saved_tensors_hooks`, each storage counted once). POET wraps every transformer-block linear
with `init_weights="normalized_gaussian"`; embeddings, norms and lm_head train in place in every row (no copies).

    python benchmarks/bench_memory.py --shapes 60m --batches 4x256 1x256 --record benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import poet_peft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reporting import publish  # noqa: E402

SHAPES = {  # hidden, FFN, heads, layers (ANCHORS: the paper's architectures)
    "60m": (512, 1280, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2816, 16, 24),
}
MIB = 2**20


def build(shape: str, vocab: int) -> LlamaForCausalLM:
    """An untied fp32 LLaMA of the named shape."""
    hidden, ffn, heads, layers = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=layers,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def wrap(model: LlamaForCausalLM, method: str) -> torch.nn.Module:
    """The model as `method` trains it: 'dense', or 'poet b=<block> <memory_mode>'."""
    if method == "dense":
        return model
    _, block, memory_mode = method.split()
    config = poet_peft.POETConfig(
        block=int(block.removeprefix("b=")), init_weights="normalized_gaussian", memory_mode=memory_mode
    )
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():  # embeddings, norms and lm_head train in place
        if "poet_" not in name and "_proj" not in name:
            param.requires_grad_(True)
    return model


def step_bytes(model: torch.nn.Module, batch: int, length: int, vocab: int) -> dict[str, int]:
    """Bytes of one AdamW step, by kind."""
    tokens = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in own:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    storage = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    storage.update({b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in model.buffers()})
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in trained)
    return {
        "parameters": sum(storage.values()),
        "gradients": gradients,
        "adamw": 2 * gradients,  # exp_avg and exp_avg_sq, each the size of its parameter (fp32 here)
        "saved": sum(saved.values()),
    }


def main() -> None:
    """Print the accounting table for every shape, batch and method."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["60m"], choices=sorted(SHAPES))
    parser.add_argument("--batches", nargs="+", default=["4x256", "1x256"], help="batch×sequence length")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["dense", "poet b=256 recompute", "poet b=256 store", "poet b=64 recompute", "poet b=64 store"],
    )
    parser.add_argument("--record", type=Path, help="append the result table to this Markdown file")
    args = parser.parse_args()
    lines = [
        f"bench_memory, {date.today()}, {platform.machine()}, torch {torch.__version__}, fp32, vocab {args.vocab}",
        "",
        "| shape | batch | method | params+buffers MiB | grads MiB | AdamW MiB | saved MiB | total MiB | × dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in args.shapes:
        for batch_text in args.batches:
            batch, length = map(int, batch_text.split("x"))
            dense_total = None
            for method in args.methods:
                counts = step_bytes(wrap(build(shape, args.vocab), method), batch, length, args.vocab)
                total = sum(counts.values())
                dense_total = dense_total or total
                cells = " | ".join(f"{counts[key] / MIB:.0f}" for key in ("parameters", "gradients", "adamw", "saved"))
                lines.append(
                    f"| {shape} | {batch_text} | {method} | {cells} | {total / MIB:.0f} | {total / dense_total:.2f} |"
                )
    publish("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
