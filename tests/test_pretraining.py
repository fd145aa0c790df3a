"""A tiny LLaMA pretrained from scratch with transformers.Trainer + POETCallback on real text (the bundled example)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pretrain_tiny.py"


def load_example():
    """The example script as a module (it only uses poet_peft's public API)."""
    spec = importlib.util.spec_from_file_location("pretrain_tiny", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_with_poet_callback_learns_real_text(tmp_path):
    example = load_example()
    metrics = example.main(
        ["--output_dir", str(tmp_path), "--max_steps", "240", "--merge_every", "40", "--max_chars", "2000000"]
    )
    uniform = math.log(2048)  # the loss of a model that knows nothing
    assert metrics["merges"] == 6
    assert metrics["first_logged_loss"] < uniform + 0.5
    assert metrics["eval_loss"] < uniform - 2.5  # ≈ 7.6 → below 5.1: far below its start
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"] - 1.0

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("poet" in type(module).__name__.lower() for module in merged.modules())
    assert torch.isfinite(merged.model.layers[0].self_attn.q_proj.weight).all()
