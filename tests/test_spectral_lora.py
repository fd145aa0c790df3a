"""Spectral-clamped LoRA: the branch's formula, the clamp, the magnitudes' optimizer group, backbones, PEFT's API."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, outputs, tiny_llama, tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import poet_peft
from poet_peft.ops.initialization import random_projection
from poet_peft.ops.seeding import seeded_generator
from poet_peft.ops.spectral import low_rank_spectral_norm


def randomize_branches(model, seed: int = 1, std: float = 0.5) -> None:
    """Give every branch non-zero B and non-unit magnitudes, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in poet_peft.spectral_lora_layers(model):
            for store in (layer.spectral_lora_B, layer.spectral_lora_magnitude):
                for param in store.values():
                    param.copy_(
                        torch.randn(param.shape, generator=generator) * std + (store is not layer.spectral_lora_B)
                    )


def dense_delta(layer, name: str = "default") -> torch.Tensor:
    """m·(α/r)·B·A as a float64 (out, in) matrix, from the parameters directly."""
    config = layer.spectral_lora_config[name]
    magnitude = layer.spectral_lora_magnitude[name].double().unsqueeze(1)
    return magnitude * config.scaling * (layer.spectral_lora_B[name].double() @ layer.spectral_lora_A[name].double())


def test_low_rank_spectral_norm_equals_the_dense_products_largest_singular_value():
    generator = torch.Generator().manual_seed(0)
    for rows, rank, cols in [(40, 4, 30), (7, 7, 50), (64, 1, 64)]:
        left = torch.randn(rows, rank, generator=generator)
        right = torch.randn(rank, cols, generator=generator)
        expected = torch.linalg.svdvals(left.double() @ right.double())[0]
        assert low_rank_spectral_norm(left, right).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("magnitude", ["scalar", "vector"])
def test_branch_adds_m_alpha_over_r_b_a_and_starts_at_zero(magnitude, tokens):
    model = tiny_llama()
    reference = outputs(model, tokens)
    config = poet_peft.SpectralLoRAConfig(r=4, lora_alpha=6.0, magnitude=magnitude)
    peft_model = get_peft_model(model, config)
    assert torch.equal(outputs(peft_model, tokens), reference)  # B = 0
    randomize_branches(peft_model)
    layer = next(poet_peft.spectral_lora_layers(peft_model))
    assert layer.spectral_lora_magnitude["default"].shape == ((layer.out_features,) if magnitude == "vector" else (1,))
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
    base = layer.get_base_layer()
    expected = x.double() @ (base.weight.double() + dense_delta(layer)).t()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.get_delta_weight("default").double(), dense_delta(layer), rtol=1e-6, atol=1e-7)


def test_trains_only_the_branch_by_default():
    model = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4))
    trainable = {name.split(".")[-2] for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {"spectral_lora_A", "spectral_lora_B", "spectral_lora_magnitude"}
    layers = list(poet_peft.spectral_lora_layers(model))
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(not layer.get_base_layer().weight.requires_grad for layer in layers)


class RandomTokens(Dataset):
    """Random token sequences for a causal LM (labels = inputs)."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def bound_ratios(model) -> list[float]:
    """σ_max of each dense float64 ΔW over its bound c/√d_in."""
    ratios = []
    for layer in poet_peft.spectral_lora_layers(model):
        sigma = torch.linalg.svdvals(dense_delta(layer))[0].item()
        ratios.append(sigma / layer.spectral_bound("default"))
    return ratios


@pytest.mark.parametrize("magnitude", ["scalar", "vector"])
def test_clamp_holds_after_large_lr_steps_in_an_accelerate_style_loop(magnitude, tokens):
    model = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4, magnitude=magnitude)).train()
    optimizer = torch.optim.AdamW(poet_peft.create_param_groups(model, lr=0.5))
    worst_before = 0.0
    for _ in range(4):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = max(bound_ratios(model))
        worst_before = max(worst_before, before)
        assert poet_peft.clamp_spectral_norms(model) == pytest.approx(before, rel=1e-6)  # reports σ/bound before
        assert max(bound_ratios(model)) <= 1 + 1e-6
    assert worst_before > 5  # the lr really pushed the branches far past the bound
    # Clamped branches sit exactly on the bound: the clamp scales, it does not zero.
    assert min(bound_ratios(model)) == pytest.approx(1.0, rel=1e-6)


def test_clamp_leaves_branches_inside_the_bound_untouched():
    model = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4))
    randomize_branches(model, std=1e-4)
    before = {name: param.clone() for name, param in model.named_parameters() if param.requires_grad}
    assert poet_peft.clamp_spectral_norms(model) < 1
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters() if param.requires_grad)


def test_a_diverged_branch_is_reported_not_silently_skipped():
    model = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4))
    layer = next(poet_peft.spectral_lora_layers(model))
    with torch.no_grad():
        layer.spectral_lora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite branch.*Lower the learning rate"):
        poet_peft.clamp_spectral_norms(model)


def test_no_clamp_when_sigma_max_is_none():
    model = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4, sigma_max=None))
    randomize_branches(model, std=5.0)
    before = [param.clone() for param in model.parameters()]
    assert poet_peft.clamp_spectral_norms(model) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_trainer_callback_clamps_after_every_optimizer_step(tmp_path):
    model = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4, magnitude="vector"))
    callback = poet_peft.SpectralClampCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.5,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[callback]).train()
    assert callback.last_ratio > 1  # it had to clamp
    assert max(bound_ratios(model)) <= 1 + 1e-6


def test_magnitudes_get_ratio_times_the_lr_and_no_weight_decay(tokens):
    model = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4, magnitude="vector"))
    randomize_branches(model)
    groups = poet_peft.create_param_groups(model, lr=1e-3, weight_decay=0.5, magnitude_lr_ratio=10)
    by_name = {group["name"]: group for group in groups}
    assert set(by_name) == {"matrices", "magnitude"}
    assert by_name["magnitude"]["lr"] == pytest.approx(1e-2) and by_name["magnitude"]["weight_decay"] == 0.0
    assert by_name["matrices"]["lr"] == 1e-3 and by_name["matrices"]["weight_decay"] == 0.5
    # One AdamW step moves each entry by lr·sign(g) (plus decay): magnitudes by 1e-2 and undecayed.
    optimizer = torch.optim.AdamW(groups, eps=1e-12)
    magnitudes = poet_peft.magnitude_parameters(model)
    before = [param.clone() for param in magnitudes]
    lora_a = next(poet_peft.spectral_lora_layers(model)).spectral_lora_A["default"]
    a_before = lora_a.clone()
    model(input_ids=tokens, labels=tokens).loss.backward()
    gradients = [param.grad.clone() for param in magnitudes]
    a_grad = lora_a.grad.clone()
    optimizer.step()
    for param, old, grad in zip(magnitudes, before, gradients):
        torch.testing.assert_close(param - old, -1e-2 * torch.sign(grad), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(lora_a - a_before * (1 - 1e-3 * 0.5), -1e-3 * torch.sign(a_grad), rtol=1e-3, atol=1e-7)


def test_create_param_groups_serves_poet_and_plain_models():
    poet = get_peft_model(tiny_llama(), poet_peft.POETConfig(block=16))
    groups = {group["name"]: group for group in poet_peft.create_param_groups(poet, 1e-2, 0.1, poet_lr=1e-3)}
    assert set(groups) == {"poet"}
    assert groups["poet"]["lr"] == 1e-3 and groups["poet"]["weight_decay"] == 0.0
    plain = tiny_llama()
    groups = {group["name"]: group for group in poet_peft.create_param_groups(plain, 1e-2, 0.1)}
    assert set(groups) == {"matrices", "vectors"}
    assert all(param.ndim >= 2 for param in groups["matrices"]["params"]) and groups["vectors"]["weight_decay"] == 0
    assert sum(len(group["params"]) for group in groups.values()) == len(list(plain.parameters()))


def test_backbones_are_as_named(tokens):
    original = {name: param.clone() for name, param in tiny_llama().named_parameters()}
    pretrained = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4, backbone="pretrained"))
    frozen_random = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4, backbone="frozen_random", seed=3))
    zero = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4, backbone="zero"))
    for model in (pretrained, frozen_random, zero):
        layers = list(poet_peft.spectral_lora_layers(model))
        assert layers and all(not layer.get_base_layer().weight.requires_grad for layer in layers)
    for layer in poet_peft.spectral_lora_layers(pretrained):
        key = layer.layer_key + ".weight"
        assert torch.equal(layer.get_base_layer().weight, original[key])
    for layer in poet_peft.spectral_lora_layers(frozen_random):
        expected = random_projection(
            "gaussian", layer.out_features, layer.in_features, seeded_generator(3, layer.layer_key, "backbone")
        )
        assert torch.equal(layer.get_base_layer().weight, expected.float())
        assert layer.get_base_layer().weight.std().item() == pytest.approx(1 / math.sqrt(layer.in_features), rel=0.1)
    for layer in poet_peft.spectral_lora_layers(zero):
        assert not layer.get_base_layer().weight.any()
    # With a zero backbone and B = 0 every wrapped layer outputs 0, so each block adds nothing to the residual
    # stream: the logits are the final norm and head applied to the embeddings.
    backbone = zero.get_base_model().model
    expected = zero.get_base_model().lm_head(backbone.norm(backbone.embed_tokens(tokens)))
    torch.testing.assert_close(outputs(zero, tokens), expected)


def test_bias_of_a_redrawn_backbone_is_zeroed_and_gpt2_conv1d_merges_exactly(tokens):
    model = get_peft_model(tiny_model("gpt2"), poet_peft.SpectralLoRAConfig(r=4, backbone="frozen_random"))
    layers = list(poet_peft.spectral_lora_layers(model))
    assert {layer.layer_key.rpartition(".")[2] for layer in layers} == {"c_attn", "c_proj", "c_fc"}
    assert all(not layer.get_base_layer().bias.any() for layer in layers)
    randomize_branches(model)
    unmerged = outputs(model, tokens)
    model.merge_adapter()
    torch.testing.assert_close(outputs(model, tokens), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_and_merge_and_unload(tokens):
    model = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4, magnitude="vector"))
    randomize_branches(model)
    weights = {
        layer.layer_key: layer.get_base_layer().weight.clone() for layer in poet_peft.spectral_lora_layers(model)
    }
    unmerged = outputs(model, tokens)
    model.merge_adapter()
    torch.testing.assert_close(outputs(model, tokens), unmerged, rtol=1e-5, atol=1e-5)
    for layer in poet_peft.spectral_lora_layers(model):
        expected = weights[layer.layer_key].double() + dense_delta(layer)
        torch.testing.assert_close(layer.get_base_layer().weight.double(), expected, rtol=1e-6, atol=1e-6)
    model.unmerge_adapter()
    for layer in poet_peft.spectral_lora_layers(model):
        torch.testing.assert_close(layer.get_base_layer().weight, weights[layer.layer_key], rtol=0, atol=1e-6)
    plain = model.merge_and_unload()
    assert not list(poet_peft.spectral_lora_layers(plain))
    torch.testing.assert_close(outputs(plain, tokens), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "architecture, backbone",
    [("llama", "pretrained"), ("llama", "frozen_random"), ("llama", "zero"), ("gpt2", "frozen_random")],
)
def test_save_and_load_round_trip(architecture, backbone, tokens, tmp_path):
    head = "lm_head"
    config = poet_peft.SpectralLoRAConfig(r=4, magnitude="vector", backbone=backbone, modules_to_save=[head])
    model = get_peft_model(tiny_model(architecture, seed=0), config).train()
    optimizer = torch.optim.AdamW(poet_peft.create_param_groups(model, lr=1e-2))
    for _ in range(3):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        poet_peft.clamp_spectral_norms(model)
    model.eval()
    expected = outputs(model, tokens)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert not any("base_layer" in key for key in keys)  # the backbone is the base model's or regenerated
    # Load into a base model with the same architecture (same seed: the pretrained backbone must match).
    loaded = PeftModel.from_pretrained(tiny_model(architecture, seed=0), tmp_path)
    torch.testing.assert_close(outputs(loaded, tokens), expected, rtol=0, atol=0)
    assert loaded.peft_config["default"].backbone == backbone
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(outputs(merged, tokens), expected, rtol=1e-5, atol=1e-5)


def test_misuse_is_refused_with_a_clear_error():
    for field, value, message in [
        ("r", 0, "r=0"),
        ("magnitude", "matrix", "magnitude='matrix'"),
        ("backbone", "random", "backbone='random'"),
        ("sigma_max", 0.0, "sigma_max=0.0"),
        ("lora_dropout", 1.0, "lora_dropout=1.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            poet_peft.SpectralLoRAConfig(**{field: value})
    with pytest.raises(ValueError, match=r"r=80.*Valid: 1 ≤ r ≤ 64"):
        get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=80))
    model = get_peft_model(tiny_llama(), poet_peft.SpectralLoRAConfig(r=4, backbone="zero"))
    with pytest.raises(ValueError, match="rewrites the base weights"):
        model.add_adapter("second", poet_peft.SpectralLoRAConfig(r=4))
