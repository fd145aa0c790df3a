"""Shared builders: tiny transformers models from configs (no downloads) and a fresh-process runner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import poet_peft  # noqa: E402

VOCAB = 128


def tiny_llama(hidden: int = 64, ffn: int = 96, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer LLaMA with hidden 64, FFN 96, seeded, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_model(architecture: str, seed: int = 0) -> torch.nn.Module:
    """A tiny seeded model of one of the architectures POET has default targets for, in eval mode."""
    torch.manual_seed(seed)
    decoder = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    builders = {
        "llama": lambda: tiny_llama(seed=seed),
        "mistral": lambda: MistralForCausalLM(MistralConfig(num_key_value_heads=2, **decoder)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **decoder)),
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        ),
        "bert": lambda: BertForSequenceClassification(
            BertConfig(
                vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
            )
        ),
    }
    return builders[architecture]().eval()


ARCHITECTURES = ["llama", "mistral", "qwen2", "gpt2", "bert"]


def outputs(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The logits of a model on a batch of token ids."""
    return model(input_ids=tokens).logits


def randomize_skew(model: torch.nn.Module, std: float, seed: int = 1) -> None:
    """Fill every active POET adapter's skew parameters with N(0, std²) entries, as training would move them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in poet_peft.poet_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def accelerate_launch(config) -> list[str]:
    """`accelerate launch --config_file config` on a free port, so that two launches can run at once (pytest -n)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--main_process_port",
        str(port),
    ]


def run_fresh_python(code: str, cwd=None) -> str:
    """Run `code` in a new Python process (nothing imported yet) and return its stdout; fail on error."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, env=os.environ.copy()
    )
    assert result.returncode == 0, f"fresh process failed:\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture
def tokens() -> torch.Tensor:
    """A fixed batch of 2 sequences of 12 token ids."""
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
