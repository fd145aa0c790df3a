"""POET-X checkpoints (Sphere-AI-Lab/poet, package `poet_torch`) to a PEFT POET adapter and base model, and back.

A POET-X layer keeps, under its Linear's name: `weight` (W0 with its rows and columns permuted), `oft_R` (packed
skew parameters, the output side's blocks first, then the input side's), `rows`/`cols` (the strict upper triangle's
indices), and int32 `perm_out`, `perm_in` with their inverses. Its layer computes W = R·W0·P as poet-peft does,
written in other conventions (checked against its code and, in the tests, against its formula
W = (BD(R_out)ᵀ·weight·BD(R_in)ᵀ)[perm_out][:, perm_in]):

- poet-peft's permutations are POET-X's inverse ones (`perm_out_inv`, `perm_in_inv`);
- poet-peft's skew parameters are the negated `oft_R`, in the same upper-triangle order;
- poet-peft's W0 is POET-X's `weight[perm_out][:, perm_in]`.

Both use R = (I+Q)(I+Q+Q²+Q³), POET-X's Triton kernel (its torch fallback, without Triton, adds 2Q⁴ instead of
Q⁴: a checkpoint trained that way converts to a slightly different function). POET-X rotates a layer's bias with R
and poet-peft does not, so a biased layer converts only while its output-side rotation is the identity.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .export import replace_folder
from .guards import raise_if_nonfinite
from .tuners.poet.config import POETConfig
from .tuners.poet.layer import POETLinear

POETX_LAYER_KEYS = ("weight", "oft_R", "rows", "cols", "perm_in", "perm_out", "perm_in_inv", "perm_out_inv")


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: model.safetensors, or a pytorch_model.bin read by torch's weights-only unpickler."""
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} holds no model.safetensors or pytorch_model.bin: not a POET-X checkpoint folder")


def _poetx_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the POET-X layers in a state dict: the prefixes of its `oft_R` tensors."""
    prefixes = sorted(key.removesuffix(".oft_R") for key in state if key.endswith(".oft_R"))
    for prefix in prefixes:
        missing = [name for name in POETX_LAYER_KEYS if f"{prefix}.{name}" not in state]
        if missing:
            raise ValueError(f"POET-X layer {prefix} lacks {', '.join(missing)}: the checkpoint is incomplete")
    return prefixes


def _block_size(packed_per_block: int) -> int:
    """b from b(b−1)/2."""
    block = (1 + math.isqrt(1 + 8 * packed_per_block)) // 2
    if block * (block - 1) // 2 != packed_per_block:
        raise ValueError(f"{packed_per_block} skew parameters per block is no b(b−1)/2: not a POET-X oft_R")
    return block


def _check_divisible(name: str, out_features: int, in_features: int, block: int) -> None:
    if out_features % block or in_features % block:
        raise ValueError(
            f"{name} is {out_features}×{in_features}, not divisible by the block {block}: POET-X has no remainder "
            "blocks (it leaves such layers dense), so this layer cannot be written in its layout"
        )


def _check_unbiased_or_unrotated(name: str, bias: torch.Tensor | None, output_skew: torch.Tensor) -> None:
    if bias is not None and output_skew.abs().max() > 0:
        raise ValueError(
            f"{name} has a bias and a trained output rotation: POET-X rotates the bias with R and poet-peft does "
            "not, so no exact conversion exists. Convert right after a merge (R = I) or train without biases."
        )


def _refuse_nonempty(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not empty: choose another output folder")


def convert_from_poetx(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write a POET-X checkpoint folder as `output_dir/base` (a plain Transformers model holding W0) and
    `output_dir/adapter` (a PEFT POET adapter); returns both folders. Load them with
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)`."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    _refuse_nonempty(output_dir)
    state = _read_state(checkpoint)
    raise_if_nonfinite(state.items(), f"to convert {checkpoint}")
    layers = _poetx_layers(state)
    if not layers:
        raise ValueError(f"{checkpoint} holds no POET-X layer (no `<module>.oft_R` tensor)")
    blocks = {_block_size(int(state[f"{prefix}.rows"].numel())) for prefix in layers}
    if len(blocks) > 1:
        raise ValueError(f"the POET-X layers use different block sizes ({sorted(blocks)}); poet-peft needs one")
    block = blocks.pop()
    plain, skews = {}, {}
    for key, tensor in state.items():
        prefix, _, name = key.rpartition(".")
        if prefix not in layers:
            plain[key] = tensor
        elif name in ("weight", "bias"):
            perm_out, perm_in = state[f"{prefix}.perm_out"].long(), state[f"{prefix}.perm_in"].long()
            out_blocks = perm_out.numel() // block
            if name == "bias":
                _check_unbiased_or_unrotated(prefix, tensor, state[f"{prefix}.oft_R"][:out_blocks])
                plain[key] = tensor[perm_out]
            else:
                _check_divisible(prefix, *tensor.shape, block)
                plain[key] = tensor[perm_out][:, perm_in]
                packed = -state[f"{prefix}.oft_R"].float()
                skews[prefix] = (packed[:out_blocks].flatten(), packed[out_blocks:].flatten())
    config = AutoConfig.from_pretrained(checkpoint)
    dtype = next(tensor.dtype for key, tensor in plain.items() if key.endswith(".weight"))
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    missing, unexpected = model.load_state_dict(plain, strict=False)
    tied = {"lm_head.weight"} if config.get_text_config().tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{checkpoint}'s tensors do not fit its config.json's {type(model).__name__}: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    # Written whole into OUT.partial, then moved into place: a failure leaves no half-converted folder.
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial / "base")
    if (checkpoint / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(partial / "base")
    poet_config = POETConfig(block=block, target_modules=layers, init_weights=None, neumann_terms=3)
    peft_model = get_peft_model(model, poet_config)
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for prefix, (left, right) in skews.items():
            layer = modules[prefix]
            layer.poet_R["default"].copy_(left)
            layer.poet_P["default"].copy_(right)
            layer.poet_perm_out["default"].copy_(state[f"{prefix}.perm_out_inv"].long())
            layer.poet_perm_in["default"].copy_(state[f"{prefix}.perm_in_inv"].long())
    base, adapter = output_dir / "base", output_dir / "adapter"
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(partial / "adapter")
    replace_folder(partial, output_dir)
    return base, adapter


def convert_to_poetx(adapter: str | os.PathLike, output_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write a PEFT POET adapter and its base model as one POET-X checkpoint folder (model.safetensors in its
    layout, config.json, the tokenizer if the base has one); returns the folder. `base_model` defaults to the one
    adapter_config.json names."""
    adapter, output_dir = Path(adapter), Path(output_dir)
    _refuse_nonempty(output_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter_config.json: not a PEFT adapter folder")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    base_model = base_model or settings.get("base_model_name_or_path")
    if settings.get("peft_type") != "POET" or not base_model:
        raise ValueError(f"{adapter} is not a POET adapter with a known base model: pass the base model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), adapter)
    config = model.peft_config["default"]
    if config.mode != "bs" or config.neumann_terms != 3:
        raise ValueError(
            f"POET-X has block-stochastic rotations with R = (I+Q)(I+Q+Q²+Q³) only; this adapter has mode="
            f"{config.mode!r}, neumann_terms={config.neumann_terms}"
        )
    block = int(config.block)
    inner = model.base_model.model
    raise_if_nonfinite(model.named_parameters(), f"to convert {adapter}")
    state = {}
    for name, tensor in inner.state_dict().items():
        if ".poet_" not in name:
            state[name.replace(".base_layer.", ".")] = tensor
    rows, cols = torch.triu_indices(block, block, 1, dtype=torch.int32)
    for prefix, layer in inner.named_modules():
        if not isinstance(layer, POETLinear):
            continue
        _check_divisible(prefix, layer.out_features, layer.in_features, block)
        perm_out, perm_in = layer.poet_perm_out["default"], layer.poet_perm_in["default"]
        left, right = layer.poet_R["default"].detach(), layer.poet_P["default"].detach()
        bias = layer.get_base_layer().bias
        _check_unbiased_or_unrotated(prefix, bias, left)
        packed = torch.cat([left.view(-1, rows.numel()), right.view(-1, rows.numel())])
        state[f"{prefix}.weight"] = layer.logical_weight().detach()[perm_out][:, perm_in].contiguous()
        if bias is not None:
            state[f"{prefix}.bias"] = bias.detach()[perm_out].contiguous()
        state[f"{prefix}.oft_R"] = (-packed).to(state[f"{prefix}.weight"].dtype)
        state.update({f"{prefix}.rows": rows.clone(), f"{prefix}.cols": cols.clone()})  # safetensors shares nothing
        for side, perm in (("out", perm_out), ("in", perm_in)):
            state[f"{prefix}.perm_{side}_inv"] = perm.to(torch.int32)
            state[f"{prefix}.perm_{side}"] = torch.argsort(perm).to(torch.int32)
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(partial / "model.safetensors"))
    inner.config.save_pretrained(partial)
    if (Path(base_model) / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(base_model).save_pretrained(partial)
    replace_folder(partial, output_dir)
    return output_dir
