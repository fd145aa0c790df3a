"""POET-X checkpoints (Sphere-AI-Lab/poet's `poet_torch` layout) to a PEFT POET adapter and back.

The POET-X checkpoint here is written by the test from that layout's documentation (poet_peft/poetx.py), and its
function is computed from POET-X's own formula for a layer's weight, independently of poet-peft's code.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import poet_peft
from poet_peft.ops.orthogonal import skew_from_packed
from poet_peft_cli import main as cli

BLOCK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def poetx_rotation_blocks(packed: torch.Tensor) -> torch.Tensor:
    """POET-X's Triton Cayley–Neumann: I + 2Q + 2Q² + 2Q³ + Q⁴ per block, in float64."""
    q = skew_from_packed(packed.double(), BLOCK)
    eye = torch.eye(BLOCK, dtype=torch.float64).expand_as(q)
    q2 = q @ q
    return eye + 2 * q + 2 * q2 + 2 * q2 @ q + q2 @ q2


def poetx_effective_weight(layer: dict[str, torch.Tensor]) -> torch.Tensor:
    """W = (BD(R_out)ᵀ · weight · BD(R_in)ᵀ)[perm_out][:, perm_in], POET-X's get_effective_weight, in float64."""
    out_blocks = layer["perm_out"].numel() // BLOCK
    blocks = poetx_rotation_blocks(layer["oft_R"])
    left, right = torch.block_diag(*blocks[:out_blocks]), torch.block_diag(*blocks[out_blocks:])
    dense = left.t() @ layer["weight"].double() @ right.t()
    return dense[layer["perm_out"].long()][:, layer["perm_in"].long()]


def write_poetx_checkpoint(folder) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A tiny LLaMA in POET-X's layout with trained-looking rotations; also the dense model it computes."""
    model = tiny_llama()
    state = dict(model.state_dict())
    generator = torch.Generator().manual_seed(7)
    dense = {}
    for name, module in model.named_modules():
        if not name.endswith(TARGETS):
            continue
        out_features, in_features = module.weight.shape
        perm_out = torch.randperm(out_features, generator=generator).to(torch.int32)
        perm_in = torch.randperm(in_features, generator=generator).to(torch.int32)
        rows, cols = torch.triu_indices(BLOCK, BLOCK, 1, dtype=torch.int32)
        blocks = (out_features + in_features) // BLOCK
        layer = {
            "weight": torch.randn(out_features, in_features, generator=generator) * 0.05,
            "oft_R": torch.randn(blocks, rows.numel(), generator=generator) * 0.05,
            "rows": rows.clone(),  # not views of one tensor: safetensors stores no shared memory
            "cols": cols.clone(),
            "perm_in": perm_in,
            "perm_out": perm_out,
            "perm_in_inv": torch.argsort(perm_in).to(torch.int32),
            "perm_out_inv": torch.argsort(perm_out).to(torch.int32),
        }
        state.update({f"{name}.{key}": tensor for key, tensor in layer.items()})
        dense[f"{name}.weight"] = poetx_effective_weight(layer).float()
    folder.mkdir()
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(folder / "model.safetensors"))
    model.config.save_pretrained(folder)
    reference = tiny_llama()
    reference.load_state_dict({**model.state_dict(), **dense})
    return state, reference


def test_poetx_checkpoint_converts_to_a_peft_adapter_with_the_same_logits_and_back_exactly(tmp_path):
    original, reference = write_poetx_checkpoint(tmp_path / "poetx")
    base, adapter = poet_peft.convert_from_poetx(tmp_path / "poetx", tmp_path / "peft")
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "POET"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = model(input_ids=tokens).logits, reference(input_ids=tokens).logits
    assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    # And back through the command line: every tensor of the POET-X checkpoint, bit for bit.
    assert cli(["convert", "--to-poetx", str(adapter), "--out", str(tmp_path / "back")]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == original.keys()
    assert [key for key in original if not torch.equal(back[key], original[key])] == []


def test_converting_refuses_what_has_no_exact_counterpart(tmp_path, capsys):
    original, _ = write_poetx_checkpoint(tmp_path / "poetx")
    # A biased layer whose output rotation is trained: POET-X rotates the bias, poet-peft does not.
    biased = dict(original, **{"model.layers.0.self_attn.q_proj.bias": torch.ones(64)})
    (tmp_path / "biased").mkdir()
    save_file(biased, str(tmp_path / "biased" / "model.safetensors"))
    (tmp_path / "biased" / "config.json").write_text((tmp_path / "poetx" / "config.json").read_text())
    with pytest.raises(ValueError, match="q_proj has a bias and a trained output rotation"):
        poet_peft.convert_from_poetx(tmp_path / "biased", tmp_path / "out")
    # Not a POET-X folder, and an output folder that holds something: one line each, nothing written or lost.
    with pytest.raises(SystemExit) as exited:
        cli(["convert", "--from-poetx", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert "poet-peft convert: error: " in capsys.readouterr().err
    (tmp_path / "taken" / "base").mkdir(parents=True)
    (tmp_path / "taken" / "base" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        poet_peft.convert_from_poetx(tmp_path / "poetx", tmp_path / "taken")
    assert (tmp_path / "taken" / "base" / "keep.txt").read_text() == "mine"
