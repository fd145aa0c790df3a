"""ORA: fixed random orthogonal Q/K as a PEFT tuner, on tiny models built from configs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, outputs, run_fresh_python, tiny_llama, tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import poet_peft
from poet_peft.ops.initialization import random_projection
from poet_peft.ops.orthogonal import orthogonality_error, random_orthogonal

F64 = torch.float64


def base_parameters(model) -> dict[str, torch.Tensor]:
    """The parameters of the layers ORA wrapped (their base layers), by name."""
    return {name: param for name, param in model.named_parameters() if ".base_layer." in name}


def train_steps(model, tokens: torch.Tensor, steps: int = 3) -> None:
    """AdamW steps with weight decay handed every parameter, frozen ones included, as a careless user would."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        outputs(model, tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


# ---------------------------------------------------------------------------------------------------- ops
@pytest.mark.parametrize("rows, cols", [(8, 8), (5, 12), (12, 5)])
def test_random_orthogonal_has_orthonormal_rows_or_columns(rows, cols):
    matrix = random_orthogonal(rows, cols, torch.Generator().manual_seed(0))
    assert matrix.shape == (rows, cols) and matrix.dtype == F64
    gram = matrix @ matrix.T if rows <= cols else matrix.T @ matrix
    assert torch.allclose(gram, torch.eye(min(rows, cols), dtype=F64), atol=1e-13)
    again = random_orthogonal(rows, cols, torch.Generator().manual_seed(0))
    assert torch.equal(matrix, again)


def test_random_orthogonal_is_haar_thanks_to_the_sign_fix():
    # Plain QR makes diag(R) negative (LAPACK's Householder convention), which pins the sign of Q's first column;
    # under the Haar measure every entry is symmetric about zero.
    generator = torch.Generator().manual_seed(1)
    corner = torch.tensor([random_orthogonal(3, 3, generator)[0, 0].item() for _ in range(2000)])
    assert abs(corner.mean().item()) < 0.05
    assert corner.abs().mean().item() > 0.4  # E|w₀₀| = 1/2 for a Haar 3×3 rotation's entry
    assert corner.square().mean().item() == pytest.approx(1 / 3, abs=0.03)  # E w² = 1/n


def test_orthogonality_error_is_the_frobenius_distance_of_the_smaller_gram_from_identity():
    # c·U with orthonormal rows U (n×m, n ≤ m) has Gram c²·I_n, hence error |c² − 1|·√n, wide or transposed;
    # a batch gives one error per matrix.
    rotation = random_orthogonal(5, 8, torch.Generator().manual_seed(2))
    for scale in (1.0, 0.5, 3.0):
        expected = abs(scale**2 - 1) * 5**0.5
        assert orthogonality_error(scale * rotation).item() == pytest.approx(expected, abs=1e-12)
        assert orthogonality_error(scale * rotation.T).item() == pytest.approx(expected, abs=1e-12)
    batch = torch.stack([random_orthogonal(5, 5, torch.Generator().manual_seed(3)), 2 * torch.eye(5, dtype=F64)])
    assert orthogonality_error(batch).tolist() == pytest.approx([0.0, 3 * 5**0.5], abs=1e-12)


def test_random_projection_stacks_orthonormal_blocks_when_taller_than_wide_and_scales_gaussians():
    tall = random_projection("orthogonal", 10, 4, torch.Generator().manual_seed(3))
    assert [orthogonality_error(block).item() < 1e-13 for block in tall.split(4)] == [True, True, True]
    gaussian = random_projection("gaussian", 512, 256, torch.Generator().manual_seed(3))
    assert gaussian.square().sum(dim=1).mean().item() == pytest.approx(1.0, rel=0.02)  # orthogonal rows' norm
    with pytest.raises(ValueError, match="valid: 'orthogonal', 'gaussian'"):
        random_projection("householder", 4, 4, torch.Generator())


# ------------------------------------------------------------------------------------------------- tuner
def test_qk_are_orthogonal_and_frozen_and_everything_else_trains(tokens):
    model = get_peft_model(tiny_llama(), poet_peft.ORAConfig())
    layers = list(poet_peft.ora_layers(model))
    assert {layer.layer_key.rpartition(".")[2] for layer in layers} == {"q_proj", "k_proj"} and len(layers) == 4
    assert max(layer.orthogonality_error() for layer in layers) < 1e-5
    fixed = base_parameters(model)
    assert all(not param.requires_grad for param in fixed.values())
    others = {name: param for name, param in model.named_parameters() if name not in fixed}
    assert all(param.requires_grad for param in others.values())
    before = {name: param.detach().clone() for name, param in model.named_parameters()}

    train_steps(model, tokens)
    assert all(param.grad is None and torch.equal(param, before[name]) for name, param in fixed.items())
    assert all(not torch.equal(param, before[name]) for name, param in others.items())
    assert max(layer.orthogonality_error() for layer in layers) < 1e-5


def test_draws_depend_on_the_seed_and_layer_only():
    first = get_peft_model(tiny_llama(seed=0), poet_peft.ORAConfig(seed=7))
    second = get_peft_model(tiny_llama(seed=1), poet_peft.ORAConfig(seed=7))
    other = get_peft_model(tiny_llama(seed=0), poet_peft.ORAConfig(seed=8))
    a, b, c = (list(base_parameters(model).values()) for model in (first, second, other))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, z) for x, z in zip(a, c))
    assert not torch.equal(a[0], a[1])  # q_proj and k_proj of a layer are independent draws


def test_gaussian_and_trainable_variants_behave_as_named(tokens):
    gaussian = get_peft_model(tiny_llama(), poet_peft.ORAConfig(init="gaussian"))
    weight = next(iter(base_parameters(gaussian).values())).detach().double()
    assert weight.std().item() == pytest.approx(64**-0.5, rel=0.05)  # N(0, 1/d_in)
    assert min(layer.orthogonality_error() for layer in poet_peft.ora_layers(gaussian)) > 1.0
    assert not any(param.requires_grad for param in base_parameters(gaussian).values())

    trainable = get_peft_model(tiny_llama(), poet_peft.ORAConfig(trainable_qk=True))
    assert max(layer.orthogonality_error() for layer in poet_peft.ora_layers(trainable)) < 1e-5  # starts orthogonal
    assert all(param.requires_grad for param in trainable.parameters())
    before = {name: param.detach().clone() for name, param in base_parameters(trainable).items()}
    train_steps(trainable, tokens)
    assert all(not torch.equal(param, before[name]) for name, param in base_parameters(trainable).items())


@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_grouped_query_attention_gets_row_orthonormal_keys_and_zero_frozen_biases(architecture, tokens):
    model = get_peft_model(tiny_model(architecture), poet_peft.ORAConfig())
    keys = [layer for layer in poet_peft.ora_layers(model) if layer.layer_key.endswith("k_proj")]
    assert {layer.logical_weight().shape for layer in keys} == {torch.Size([32, 64])}  # 2 KV heads × 16 < 64
    assert max(layer.orthogonality_error() for layer in keys) < 1e-5
    biases = [param for name, param in base_parameters(model).items() if name.endswith("bias")]
    assert len(biases) == (4 if architecture == "qwen2" else 0)
    assert all(not param.requires_grad and not param.any() for param in biases)
    assert torch.isfinite(outputs(model, tokens)).all()


def test_more_query_rows_than_inputs_are_orthonormal_per_stack_of_heads():
    # Qwen3-like: 4 heads × 32 = 128 query rows from a 64-dim input; each stack of 64 rows (2 whole heads) is.
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, head_dim=32
    )
    model = get_peft_model(LlamaForCausalLM(config), poet_peft.ORAConfig())
    query = next(layer for layer in poet_peft.ora_layers(model) if layer.layer_key.endswith("q_proj"))
    assert query.logical_weight().shape == (128, 64) and query.orthogonality_error() < 1e-5


def test_gpt2_freezes_only_the_q_and_k_thirds_of_c_attn(tokens):
    model = get_peft_model(tiny_model("gpt2"), poet_peft.ORAConfig())
    layers = list(poet_peft.ora_layers(model))
    assert [layer.ora_projections["default"] for layer in layers] == [((0, 64), (64, 128))] * 2
    assert max(layer.orthogonality_error() for layer in layers) < 1e-5
    values = [layer.ora_value_weight["default"] for layer in layers]
    assert all(value.requires_grad and value.shape == (64, 64) for value in values)
    before = [value.detach().clone() for value in values]
    qk = [layer.logical_weight()[:128].detach().clone() for layer in layers]
    with torch.no_grad():
        reference = outputs(model, tokens)

    train_steps(model, tokens)
    assert all(torch.equal(layer.logical_weight()[:128], q) for layer, q in zip(layers, qk))
    assert all(not torch.equal(value, old) for value, old in zip(values, before))
    with torch.no_grad():
        trained = outputs(model, tokens)
    assert not torch.allclose(trained, reference)
    merged = model.merge_and_unload()
    for block, value in zip(merged.transformer.h, values):
        assert torch.equal(block.attn.c_attn.weight[:, 128:], value.t())
    torch.testing.assert_close(outputs(merged, tokens), trained, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gpt2_trains_its_v_rows_in_fp32_and_computes_in_the_model_dtype(dtype, tokens):
    model = get_peft_model(tiny_model("gpt2").to(dtype), poet_peft.ORAConfig())
    layer = next(poet_peft.ora_layers(model))
    value = layer.ora_value_weight["default"]
    assert value.dtype == torch.float32 and layer.logical_weight().dtype == dtype  # PEFT's adapter autocast
    assert layer.ora_draw_checksum["default"].dtype == torch.int64  # not rounded by the cast
    reference = torch.cat([layer.logical_weight()[:128], value.to(dtype)])
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    bias = torch.cat([layer.get_base_layer().bias[:128], layer.ora_value_bias["default"].to(dtype)])
    result = layer(x)
    assert result.dtype == dtype
    torch.testing.assert_close(result.float(), x.float() @ reference.float().T + bias.float(), atol=2e-2, rtol=1e-2)
    model.train()
    outputs(model, tokens).float().square().mean().backward()
    assert value.grad.dtype == torch.float32 and value.grad.abs().sum() > 0
    merged = model.merge_and_unload()
    assert torch.equal(merged.transformer.h[0].attn.c_attn.weight[:, 128:], value.to(dtype).t())


def test_activation_and_gradient_switches_cover_the_whole_model_except_fixed_qk():
    model = get_peft_model(tiny_model("gpt2"), poet_peft.ORAConfig())
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    fixed = {name for name, param in model.named_parameters() if ".base_layer." in name}
    assert trainable and not trainable & fixed and len(trainable) + len(fixed) == len(list(model.parameters()))
    model.base_model.set_adapter("default", inference_mode=True)
    assert not any(param.requires_grad for param in model.parameters())
    model.set_requires_grad("default", True)
    assert {name for name, param in model.named_parameters() if param.requires_grad} == trainable
    model.set_requires_grad(["default"], False)
    assert not any(param.requires_grad for param in model.parameters())
    model.set_adapter("default")
    assert {name for name, param in model.named_parameters() if param.requires_grad} == trainable
    with pytest.raises(ValueError, match=r"No ORA adapter named \['other'\]"):
        model.set_requires_grad("other")
    values = [layer.ora_value_weight["default"].detach().clone() for layer in poet_peft.ora_layers(model)]
    with pytest.raises(ValueError, match="cannot be deleted.*merge_and_unload"):
        model.delete_adapter("default")
    kept = [layer.ora_value_weight["default"] for layer in poet_peft.ora_layers(model)]  # nothing was lost
    assert all(torch.equal(old, new) for old, new in zip(values, kept))


@pytest.mark.parametrize("architecture", ["llama", "mistral", "gpt2", "bert"])
def test_save_and_load_reproduce_the_logits_exactly_from_the_seed(architecture, tokens, tmp_path):
    model = get_peft_model(tiny_model(architecture), poet_peft.ORAConfig(seed=5))
    train_steps(model, tokens)
    with torch.no_grad():
        expected = outputs(model, tokens)
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    recipe = (config["peft_type"], config["seed"], config["init"], config["trainable_qk"])
    assert recipe == ("ORA", 5, "orthogonal", False)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not any(".base_layer." in key for key in saved)  # the recipe, not the Q/K matrices
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {name.replace(".default", "") for name in trained} <= set(saved)  # and every trained tensor

    fresh = tiny_model(architecture, seed=11)  # a differently initialised base: every trained weight must load
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(outputs(loaded, tokens), expected)
    assert not any(param.requires_grad for param in loaded.parameters())  # inference mode, as PEFT does
    resumed = PeftModel.from_pretrained(tiny_model(architecture, seed=11), tmp_path, is_trainable=True)
    assert {name for name, param in resumed.named_parameters() if param.requires_grad} == trained


def test_loading_trained_weights_against_other_draws_is_refused(tokens, tmp_path):
    model = get_peft_model(tiny_llama(), poet_peft.ORAConfig(seed=5))
    model.save_pretrained(tmp_path)
    checksums = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if "checksum" in k}
    assert len(checksums) == 4 and all(v.dtype == torch.int64 for v in checksums.values())
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"seed": 5', '"seed": 6'))  # as if drawn elsewhere
    with pytest.raises(ValueError, match=r"redrew different Q/K for model\.layers\.0\.self_attn\.q_proj"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    config_file.write_text(config_file.read_text().replace('"seed": 6', '"seed": 5'))
    with pytest.raises(ValueError, match=r"lacks 20 of the tensors this model expects .* another model class"):
        PeftModel.from_pretrained(tiny_llama().model, tmp_path)  # the bare LlamaModel: paths lack "model."
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path)  # and the right class loads


def test_merged_model_loads_in_plain_transformers_with_the_same_logits(tokens, tmp_path):
    model = get_peft_model(tiny_llama(), poet_peft.ORAConfig())
    train_steps(model, tokens)
    with torch.no_grad():
        expected = outputs(model, tokens)
    merged = model.merge_and_unload()
    assert type(merged) is LlamaForCausalLM and not list(poet_peft.ora_layers(merged))
    merged.save_pretrained(tmp_path)
    plain = run_fresh_python(
        f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
        assert not any(name.startswith(("poet_peft", "peft")) for name in sys.modules)
        with torch.no_grad():
            print(json.dumps(model(input_ids=torch.tensor({tokens.tolist()})).logits.tolist()))
        """
    )
    torch.testing.assert_close(torch.tensor(json.loads(plain)), expected, atol=1e-5, rtol=1e-5)


def test_seed_003_example_freezes_2_d_squared_per_layer():
    # d=768, h=12, L=12: Q and K are 768×768 each, 2·d²·L = 14,155,776 frozen (the seed's "14.15M").
    config = LlamaConfig(
        vocab_size=32, hidden_size=768, intermediate_size=32, num_hidden_layers=12, num_attention_heads=12
    )
    model = get_peft_model(LlamaForCausalLM(config), poet_peft.ORAConfig())
    trainable, total = model.get_nb_trainable_parameters()
    assert total - trainable == 2 * 768**2 * 12 == 14_155_776
    attention = 4 * 768**2 * 12
    assert trainable == total - attention // 2  # half of the attention projections, nothing else


def test_misuse_is_refused_with_a_clear_error(tokens):
    with pytest.raises(ValueError, match="valid: 'orthogonal', 'gaussian'"):
        poet_peft.ORAConfig(init="uniform")
    model = get_peft_model(tiny_llama(), poet_peft.ORAConfig())
    with torch.no_grad():
        expected = outputs(model, tokens)
    with pytest.raises(ValueError, match="one ORA adapter"):
        model.add_adapter("second", poet_peft.ORAConfig(seed=1))
    with pytest.raises(ValueError, match="cannot be disabled"):
        with model.disable_adapter():
            pass
    with pytest.raises(ValueError, match="merge_and_unload"):
        model.unload()
    with torch.no_grad():
        assert torch.equal(outputs(model, tokens), expected)  # nothing was lost on the way
    with pytest.raises(ValueError, match="not a multiple of 3"):
        get_peft_model(tiny_llama(), poet_peft.ORAConfig(target_modules=["q_proj"], fused_qkv_modules=["q_proj"]))
    unknown = torch.nn.Sequential(torch.nn.Linear(4, 4))
    unknown.config = {"model_type": "mamba"}
    with pytest.raises(ValueError, match="ORA has no default targets for model_type='mamba'"):
        get_peft_model(unknown, poet_peft.ORAConfig())


def test_attention_logits_start_at_unit_scale_as_documented():
    # After the pre-attention RMSNorm ‖x‖² ≈ d; a head's orthonormal rows then give q·k/√d_k a std of about 1,
    # where Transformers' default N(0, 0.02²) init gives 0.02²·d (0.05 at d=128): near-uniform attention.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=1)
    stds = {}
    for name in ("default", "ora"):
        model = LlamaForCausalLM(config)
        attention = model.model.layers[0].self_attn
        if name == "ora":
            model = get_peft_model(model, poet_peft.ORAConfig())
        captured = {}
        handle = attention.register_forward_hook(
            lambda module, args, kwargs, out: captured.update(x=kwargs["hidden_states"]), with_kwargs=True
        )
        with torch.no_grad():
            model(input_ids=torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0)))
            x = captured["x"]
            q = attention.q_proj(x).unflatten(-1, (-1, 32)).transpose(1, 2)
            k = attention.k_proj(x).unflatten(-1, (-1, 32)).transpose(1, 2)
        handle.remove()
        stds[name] = (q @ k.transpose(-1, -2) / 32**0.5).std().item()
    assert stds["ora"] == pytest.approx(1.0, abs=0.15)
    assert stds["default"] == pytest.approx(0.02**2 * 128, rel=0.15)
