"""PEFT semantics: registration, merge/unmerge, unload, adapters, and save/load in fresh processes."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import pytest
import torch
from conftest import outputs, randomize_skew, run_fresh_python, tiny_llama, tiny_model
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import poet_peft
from poet_peft import POETConfig


def test_import_keeps_bitsandbytes_hub_kernel_warning_and_peft_deprecations_quiet():
    # bitsandbytes (installed here for GaLore) logs, on CPUs with AVX512-BF16, that it could not fetch a Hub kernel;
    # get_peft_model trips transformers' is_gradient_checkpointing FutureWarning. Neither is the user's business.
    printed = run_fresh_python(
        """
        import logging, sys, warnings
        logging.basicConfig(stream=sys.stdout)
        import poet_peft
        from peft import get_peft_model
        from conftest import tiny_llama
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        with warnings.catch_warnings(record=True) as caught:  # the filters in place, recorded
            get_peft_model(tiny_llama(), poet_peft.POETConfig(block=16))
        print([str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)])
        """,
        cwd=Path(__file__).parent,
    )
    assert printed.strip() == "[]"


def test_import_registers_poet_idempotently():
    assert PeftType("POET") is PeftType.POET and "POET" in list(PeftType)
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.POET] is poet_peft.POETModel
    importlib.reload(poet_peft)
    importlib.reload(importlib.import_module("poet_peft.registry"))
    poet_peft.register_tuner("poet", poet_peft.POETConfig, poet_peft.POETModel)
    assert list(PeftType).count(PeftType.POET) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.POET] is poet_peft.POETConfig
    assert POETConfig().peft_type == PeftType.POET == "POET"


def test_config_round_trips_through_json(tmp_path):
    config = POETConfig(block=0.5, mode="fs", neumann_terms=None, merge_every=25, target_modules=["q_proj"], seed=7)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "POET" and saved["block"] == 0.5 and saved["neumann_terms"] is None
    loaded = POETConfig.from_pretrained(tmp_path)
    assert (loaded.block, loaded.mode, loaded.merge_every, loaded.seed) == (0.5, "fs", 25, 7)
    assert loaded.target_modules == {"q_proj"}


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_merge_and_unmerge_are_exact(architecture, tokens):
    peft_model = get_peft_model(tiny_model(architecture), POETConfig(block=16))
    randomize_skew(peft_model, std=0.05)  # ‖Q‖₂ ≈ 0.4: the Neumann R is visibly not orthogonal
    layers = list(poet_peft.poet_layers(peft_model))
    w0 = [layer.logical_weight().clone() for layer in layers]
    unmerged = outputs(peft_model, tokens)
    peft_model.merge_adapter()
    assert all(layer.merged for layer in layers)
    assert (outputs(peft_model, tokens) - unmerged).abs().max() < 1e-5
    merged_weights = [layer.logical_weight().clone() for layer in layers]
    peft_model.unmerge_adapter()
    assert max((layer.logical_weight() - w).abs().max().item() for layer, w in zip(layers, w0)) < 1e-5
    assert (outputs(peft_model, tokens) - unmerged).abs().max() < 1e-5
    # Undoing the merge with transposes, as if the Neumann R were orthogonal, would miss W0 by far more than 1e-5.
    layer, merged = layers[0], merged_weights[0].double()
    left, right = layer.rotations("default", torch.float64)
    dense_left = left.apply(torch.eye(merged.shape[0], dtype=torch.float64)).t()
    dense_right = right.apply(torch.eye(merged.shape[1], dtype=torch.float64)).t()
    assert torch.allclose(dense_left @ w0[0].double() @ dense_right, merged, atol=1e-6)
    assert (dense_left.t() @ merged @ dense_right.t() - w0[0].double()).abs().max() > 1e-3


def test_delta_weight_is_what_merging_adds(tokens):
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16))
    randomize_skew(peft_model, std=0.05)
    layer = next(poet_peft.poet_layers(peft_model))
    w0 = layer.logical_weight().clone()
    delta = layer.get_delta_weight("default")
    layer.merge()
    assert torch.allclose(layer.logical_weight(), w0 + delta, atol=1e-6)


@pytest.mark.parametrize("architecture, base_type", [("llama", torch.nn.Linear), ("gpt2", Conv1D)])
def test_merge_and_unload_gives_plain_transformers_modules(architecture, base_type, tokens, tmp_path):
    peft_model = get_peft_model(tiny_model(architecture), POETConfig(block=16))
    randomize_skew(peft_model, std=0.05)
    expected = outputs(peft_model, tokens)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, poet_peft.POETLinear) or "poet" in type(m).__name__.lower() for m in merged.modules())
    assert not any("poet_" in name or "base_layer" in name for name, _ in merged.named_parameters())
    assert sum(isinstance(m, base_type) for m in merged.modules()) >= 8
    assert (outputs(merged, tokens) - expected).abs().max() < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    torch.save(tokens, tmp_path / "tokens.pt")
    torch.save(expected, tmp_path / "expected.pt")
    printed = run_fresh_python(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}).eval()
        tokens = torch.load({str(tmp_path / "tokens.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        print((model(input_ids=tokens).logits - expected).abs().max().item(), "poet_peft" in sys.modules)
        """
    )
    difference, imported = printed.split()
    assert float(difference) < 1e-5 and imported == "False"


def test_unload_and_disable_adapter_give_back_the_base_model(tokens):
    model = tiny_llama()
    base = outputs(model, tokens)
    peft_model = get_peft_model(model, POETConfig(block=16))
    randomize_skew(peft_model, std=0.05)
    adapted = outputs(peft_model, tokens)
    assert (adapted - base).abs().max() > 1e-3
    with peft_model.disable_adapter():
        assert torch.equal(outputs(peft_model, tokens), base)
    assert torch.equal(outputs(peft_model, tokens), adapted)
    peft_model.merge_adapter()
    with peft_model.disable_adapter():  # a merged adapter is unmerged to disable it
        assert (outputs(peft_model, tokens) - base).abs().max() < 1e-5
    unloaded = copy.deepcopy(peft_model).unload()
    assert not any(isinstance(m, poet_peft.POETLinear) for m in unloaded.modules())
    assert (outputs(unloaded, tokens) - base).abs().max() < 1e-5


def test_set_adapter_and_delete_adapter(tokens):
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16), adapter_name="a")
    randomize_skew(peft_model, std=0.05, seed=1)
    only_a = outputs(peft_model, tokens)
    peft_model.add_adapter("b", POETConfig(block=32, target_modules=["q_proj", "v_proj"]))
    peft_model.set_adapter("b")
    for layer in poet_peft.poet_layers(peft_model):
        assert not layer.poet_R["a"].requires_grad and not layer.poet_P["a"].requires_grad
        if "b" in layer.poet_R:
            assert layer.poet_R["b"].requires_grad and layer.poet_P["b"].requires_grad
    randomize_skew(peft_model, std=0.05, seed=2)
    only_b = outputs(peft_model, tokens)
    assert (only_b - only_a).abs().max() > 1e-3
    reference = get_peft_model(tiny_llama(), POETConfig(block=32, target_modules=["q_proj", "v_proj"]))
    for layer, twin in zip(
        (layer for layer in poet_peft.poet_layers(peft_model) if "b" in layer.poet_R), poet_peft.poet_layers(reference)
    ):
        with torch.no_grad():
            twin.poet_R["default"].copy_(layer.poet_R["b"])
            twin.poet_P["default"].copy_(layer.poet_P["b"])
            twin.poet_perm_out["default"].copy_(layer.poet_perm_out["b"])
            twin.poet_perm_in["default"].copy_(layer.poet_perm_in["b"])
    assert torch.allclose(outputs(reference, tokens), only_b, atol=1e-6)
    peft_model.set_adapter("a")
    assert torch.equal(outputs(peft_model, tokens), only_a)
    peft_model.delete_adapter("b")
    assert not any("b" in layer.poet_R for layer in poet_peft.poet_layers(peft_model))
    assert torch.equal(outputs(peft_model, tokens), only_a)


RELOAD = """
import torch, poet_peft
from peft import PeftModel
from conftest import outputs, tiny_model
tokens = torch.load("tokens.pt", weights_only=True)
model = PeftModel.from_pretrained(tiny_model("{architecture}", seed={base_seed}), "adapter").eval()
print(torch.equal(outputs(model, tokens), torch.load("expected.pt", weights_only=True)))
"""


TRAINED_IN_FULL = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head"]
PRETRAINING = dict(init_weights="normalized_gaussian", modules_to_save=TRAINED_IN_FULL)
PRETRAINING_IN_PLACE = dict(init_weights="normalized_gaussian", train_in_place=TRAINED_IN_FULL)
EXTRA = {POETConfig: dict(block=16), poet_peft.SpectralLoRAConfig: dict(r=4)}


@pytest.mark.parametrize(
    "architecture, merges, extra, base_seed",
    [
        ("llama", 0, {}, 0),
        ("llama", 3, {}, 0),
        ("gpt2", 3, {}, 0),
        ("llama", 3, PRETRAINING, 5),
        ("llama", 3, PRETRAINING_IN_PLACE, 5),
    ],
    ids=["finetune-no-merge", "finetune-merged", "conv1d-merged", "pretrain-other-base", "pretrain-in-place"],
)
def test_save_and_load_in_a_fresh_process_reproduce_outputs_exactly(
    architecture, merges, extra, base_seed, tokens, tmp_path, request
):
    peft_model = get_peft_model(tiny_model(architecture), POETConfig(block=16, merge_every=1, **extra))
    for merge in range(merges):
        randomize_skew(peft_model, std=0.05, seed=merge)
        poet_peft.merge_and_reinit(peft_model)
    randomize_skew(peft_model, std=0.05, seed=99)
    peft_model.save_pretrained(tmp_path / "adapter")
    torch.save(tokens, tmp_path / "tokens.pt")
    torch.save(outputs(peft_model, tokens), tmp_path / "expected.pt")

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    poet_keys = [key for key in saved if "poet_" in key or key.endswith("base_layer.weight")]
    suffixes = (
        "poet_R",
        "poet_P",
        "poet_perm_out",
        "poet_perm_in",
        "poet_merge_count",
        "poet_base_rewritten",
        "poet_base_spectrum",
    )
    assert all(key.endswith((*suffixes, "base_layer.weight")) for key in poet_keys)
    # W0 travels in the adapter file once merges or a fresh init have rewritten it, and only then.
    rewritten = bool(merges or extra)
    layers = len(list(poet_peft.poet_layers(peft_model)))
    assert sum(key.endswith("base_layer.weight") for key in saved) == (layers if rewritten else 0)
    assert {bool(v) for k, v in saved.items() if k.endswith("poet_base_rewritten")} == {rewritten}
    assert {int(v) for k, v in saved.items() if k.endswith("poet_merge_count")} == {merges}

    # The reloading base model still has the original weights (or, for pretraining, other random ones): the
    # merged W0, the permutations and Q must all come from the adapter file.
    tests_dir = request.path.parent
    code = f"import sys; sys.path.insert(0, {str(tests_dir)!r})\n" + RELOAD.format(
        architecture=architecture, base_seed=base_seed
    )
    assert run_fresh_python(code, cwd=tmp_path).strip() == "True"


@pytest.mark.parametrize("config_cls", [POETConfig, poet_peft.SpectralLoRAConfig])
def test_train_in_place_trains_the_named_modules_without_a_copy_and_saves_them(config_cls, tokens, tmp_path):
    model = get_peft_model(tiny_model("llama"), config_cls(train_in_place=TRAINED_IN_FULL, **EXTRA[config_cls]))
    names = [name for name, _ in model.named_parameters()]
    assert not [name for name in names if "modules_to_save" in name or "original_module" in name]
    embeddings = model.get_input_embeddings().weight
    assert embeddings.requires_grad and model.base_model.model.model.norm.weight.requires_grad
    assert not any(p.requires_grad for name, p in model.named_parameters() if "base_layer" in name)
    with torch.no_grad():
        embeddings.add_(0.5)  # what training in place does: the model's own tensor changes
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.model.embed_tokens.weight"], embeddings.detach())

    frozen = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    assert torch.equal(frozen.get_input_embeddings().weight, embeddings.detach())
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter", is_trainable=True)
    assert trainable.get_input_embeddings().weight.requires_grad
    assert torch.equal(outputs(trainable, tokens), outputs(model, tokens))


def test_train_in_place_refuses_unknown_names_overlaps_and_targets():
    with pytest.raises(ValueError, match="names 'embeddings', but no module of the model is called that"):
        get_peft_model(tiny_model("llama"), POETConfig(block=16, train_in_place=["embeddings"]))
    with pytest.raises(ValueError, match="both train_in_place and modules_to_save"):
        get_peft_model(
            tiny_model("llama"), POETConfig(block=16, train_in_place=["lm_head"], modules_to_save=["lm_head"])
        )
    with pytest.raises(ValueError, match="holds layers the adapter wraps"):
        get_peft_model(tiny_model("llama"), POETConfig(block=16, train_in_place=["self_attn"]))


def test_saving_while_merged_stores_w0(tokens, tmp_path):
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16))
    randomize_skew(peft_model, std=0.05)
    poet_peft.merge_and_reinit(peft_model)
    randomize_skew(peft_model, std=0.05, seed=2)
    w0 = {
        f"{name}.base_layer.weight": layer.get_base_layer().weight.clone()
        for name, layer in peft_model.named_modules()
        if isinstance(layer, poet_peft.POETLinear)
    }
    expected = outputs(peft_model, tokens)
    peft_model.merge_adapter()
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert max((saved[key] - weight).abs().max().item() for key, weight in w0.items()) < 1e-6
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (outputs(reloaded, tokens) - expected).abs().max() < 1e-5


def test_loading_without_importing_poet_peft_fails_with_the_type_name(tmp_path):
    get_peft_model(tiny_llama(), POETConfig(block=16)).save_pretrained(tmp_path)
    result = run_fresh_python(
        f"""
        from peft import PeftConfig
        try:
            PeftConfig.from_pretrained({str(tmp_path)!r})
        except Exception as error:
            print(type(error).__name__, error)
        """
    )
    assert "POET" in result


def test_w0_is_saved_after_the_adapter_that_merged_it_is_deleted(tokens, tmp_path):
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16), adapter_name="a")
    randomize_skew(peft_model, std=0.05)
    poet_peft.merge_and_reinit(peft_model)
    peft_model.add_adapter("b", POETConfig(block=32))
    peft_model.set_adapter("b")
    randomize_skew(peft_model, std=0.05, seed=4)
    peft_model.delete_adapter("a")
    expected = outputs(peft_model, tokens)
    peft_model.save_pretrained(tmp_path, selected_adapters=["b"])
    saved = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert sum(key.endswith("base_layer.weight") for key in saved) == 14
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "b")
    assert torch.equal(outputs(reloaded, tokens), expected)


def test_loading_a_second_adapter_that_carries_w0_refuses_to_overwrite_the_first(tokens, tmp_path):
    merged_one = get_peft_model(tiny_llama(), POETConfig(block=16))
    randomize_skew(merged_one, std=0.05)
    poet_peft.merge_and_reinit(merged_one)
    merged_one.save_pretrained(tmp_path / "merged")
    other = get_peft_model(tiny_llama(), POETConfig(block=16))
    randomize_skew(other, std=0.05, seed=7)
    expected = outputs(other, tokens)
    with pytest.raises(ValueError, match=r"carries its own W0 .* would overwrite the W0 that adapter\(s\) default"):
        other.load_adapter(tmp_path / "merged", adapter_name="second")
    other.set_adapter("default")
    assert torch.equal(outputs(other, tokens), expected)


def test_low_memory_loading_of_a_bf16_model_keeps_q_in_float32(tmp_path):
    peft_model = get_peft_model(tiny_llama().to(torch.bfloat16), POETConfig(block=16))
    randomize_skew(peft_model, std=0.0123)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path, low_cpu_mem_usage=True)
    for saved, loaded in zip(poet_peft.poet_parameters(peft_model), poet_peft.poet_parameters(reloaded)):
        assert loaded.dtype == torch.float32 and torch.equal(saved, loaded)
