"""The POET layer inside real transformers models: identity at init, targets, counts, forward paths, dtypes, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import ARCHITECTURES, VOCAB, outputs, randomize_skew, tiny_llama, tiny_model
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import poet_peft
from poet_peft import POETConfig
from poet_peft.ops.blocks import PERMUTED_ELEMENT_FLOPS, packed_gradient, placement_cost, rotation_flops
from poet_peft.tuners.poet import DEFAULT_TARGET_MODULES


@pytest.mark.parametrize("forward_path", ["auto", "weight", "input"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_outputs_are_bit_identical_right_after_get_peft_model(architecture, forward_path, tokens):
    # 2×40 tokens: under "auto" R goes on the weight of every layer with ≤ 80 inputs, P stays on the activations
    # of layers with > 80 outputs, so the mixed formulation is exercised too.
    long_tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    model = tiny_model(architecture)
    reference, long_reference = outputs(model, tokens), outputs(model, long_tokens)
    peft_model = get_peft_model(model, POETConfig(block=16, forward_path=forward_path))
    assert torch.equal(outputs(peft_model, tokens), reference)
    assert torch.equal(outputs(peft_model, long_tokens), long_reference)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_default_targets_are_the_transformer_block_linears(architecture):
    peft_model = get_peft_model(tiny_model(architecture), POETConfig(block=16))
    wrapped = {name for name, module in peft_model.named_modules() if isinstance(module, poet_peft.POETLinear)}
    suffixes = DEFAULT_TARGET_MODULES[architecture]
    expected = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, torch.nn.Linear | poet_peft.POETLinear) or type(module).__name__ == "Conv1D"
    }
    expected = {name for name in expected if any(name == s or name.endswith("." + s) for s in suffixes)}
    assert {name.removeprefix("base_model.model.") for name in wrapped} == expected
    assert len(wrapped) == 2 * {"gpt2": 4, "bert": 6}.get(architecture, 7)
    assert not any("lm_head" in name or "pooler" in name or "classifier" in name for name in wrapped)


def llama_60m(ffn: int) -> LlamaForCausalLM:
    """The paper's LLaMA-60M shape (hidden 512, 8 layers, 8 heads), with a small vocabulary to save memory."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=ffn,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "config, ffn, expected",
    [
        (POETConfig(block=256), 1280, 9_661_440),  # paper: 9.66M
        (POETConfig(block=128), 1280, 4_811_776),  # paper: 4.81M
        (POETConfig(block=64), 1280, 2_386_944),  # paper: 2.39M
        # The FS rows of the paper's Table 2 use FFN 1376 (GaLore's 60M); 1376 is no multiple of 256.
        (POETConfig(block=0.5, mode="fs"), 1376, 8_544_192),  # paper: 8.54M
        (POETConfig(block=0.25, mode="fs"), 1376, 2_131_168),  # paper: 2.13M
        (POETConfig(block=0.125, mode="fs"), 1376, 530_352),  # paper: 0.53M
    ],
    ids=["bs256", "bs128", "bs64", "fs1/2", "fs1/4", "fs1/8"],
)
def test_trainable_parameter_counts_match_the_paper(config, ffn, expected):
    trainable, _ = get_peft_model(llama_60m(ffn), config).get_nb_trainable_parameters()
    assert trainable == expected


def float64_reference(peft_model, tokens: torch.Tensor) -> torch.Tensor:
    """The same model evaluated in float64 with every adapter merged into its weight."""
    reference = copy.deepcopy(peft_model).double()
    reference.merge_adapter()
    return outputs(reference, tokens)


@pytest.mark.parametrize("mode, block", [("bs", 16), ("bs", 24), ("fs", 0.3)])
@pytest.mark.parametrize("architecture", ["llama", "gpt2", "bert"])
def test_weight_and_input_centric_paths_agree_with_float64(architecture, mode, block, tokens):
    peft_model = get_peft_model(tiny_model(architecture), POETConfig(block=block, mode=mode))
    randomize_skew(peft_model, std=0.05)
    reference = float64_reference(peft_model, tokens)
    results = {}
    for path in ("weight", "input", "auto"):
        for layer in poet_peft.poet_layers(peft_model):
            layer.poet_config["default"].forward_path = path
        results[path] = outputs(peft_model, tokens)
        assert (results[path].double() - reference).abs().max() < 1e-5 * reference.abs().max()
    assert (results["weight"] - results["input"]).abs().max() > 0  # two genuinely different computations


def test_auto_path_puts_each_rotation_where_it_is_cheaper():
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16))
    up_proj = peft_model.base_model.model.model.layers[0].mlp.up_proj  # in 64, out 96
    assert up_proj.rotation_sides(["default"], tokens=1) == (False, False)  # decoding: rotate activations
    assert up_proj.rotation_sides(["default"], tokens=80) == (True, False)  # R on the weight (64 columns)
    assert up_proj.rotation_sides(["default"], tokens=4096) == (True, True)  # pretraining batch: R·W0·P
    up_proj.poet_config["default"].forward_path = "input"
    assert up_proj.rotation_sides(["default"], tokens=4096) == (False, False)


SIDES = [(True, True), (True, False), (False, True), (False, False)]


class OneLinear(torch.nn.Module):
    """A single bias-free d×d linear layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def counted_flops(
    layer, x: torch.Tensor, sides: tuple[bool, bool], training: bool, recompute: bool, monkeypatch
) -> int:
    """Matmul flops torch runs for the layer's forward (and backward) with R, P placed by `sides`, minus Cayley's:
    one build of R and P, one more in a recomputing backward (to rotate), and in training their gradient
    (`packed_gradient`, written out)."""
    monkeypatch.setattr(layer, "rotation_sides", lambda *args, **kwargs: sides)
    with torch.set_grad_enabled(training), FlopCounterMode(display=False) as total:
        output = layer(x)
        if training:
            output.sum().backward()
    with torch.no_grad(), FlopCounterMode(display=False) as built:
        rotations = layer.rotations("default")
    with FlopCounterMode(display=False) as differentiated:
        for rotation, q in zip(rotations, layer.skew_parameters()):
            grads = [torch.ones_like(b) for b in rotation.blocks]
            packed_gradient(rotation.layout, q, grads, layer.poet_config["default"].neumann_terms)
    builds = 1 + recompute
    cayley = builds * built.get_total_flops() + training * differentiated.get_total_flops()
    return total.get_total_flops() - cayley


@pytest.mark.parametrize("memory_mode", ["recompute", "store"])
@pytest.mark.parametrize("training,input_needs_grad", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize(
    "mode,block,tokens",
    [("bs", 16, 1), ("bs", 16, 80), ("bs", 16, 4096), ("bs", 4, 200), ("bs", 20, 100), ("fs", 0.5, 100)],
)
def test_rotation_flops_are_what_torch_computes(
    mode, block, tokens, training, input_needs_grad, memory_mode, monkeypatch
):
    # b=20 leaves remainder blocks (64 = 3·20 + 4, 96 = 4·20 + 16), and FS rotates unequal shares of the two sides.
    config = POETConfig(block=block, mode=mode, memory_mode=memory_mode)
    peft_model = get_peft_model(tiny_llama(), config)
    up_proj = peft_model.base_model.model.model.layers[0].mlp.up_proj  # in 64, out 96
    left, right = up_proj.poet_layouts["default"]
    x = torch.randn(tokens, 64, requires_grad=input_needs_grad)
    recompute = training and memory_mode == "recompute"
    with monkeypatch.context() as patch:
        counted = {sides: counted_flops(up_proj, x, sides, training, recompute, patch) for sides in SIDES}
    assert counted == {
        sides: rotation_flops(left, right, tokens, *sides, training, input_needs_grad, recompute) for sides in SIDES
    }


def test_auto_path_weighs_flops_and_data_movement():
    layer = get_peft_model(OneLinear(3072), POETConfig(block=16, target_modules=["proj"])).base_model.model.proj
    left, right = layer.poet_layouts["default"]
    # Moving an element costs PERMUTED_ELEMENT_FLOPS: here 2 sides × 5 passes (gather and back in the forward; the
    # gradient and the input gathered, the gradient put back, in the backward) over the 8192·3072 activations.
    inside = placement_cost(left, right, 8192, (False, False), True, True)
    assert (
        inside
        == rotation_flops(left, right, 8192, False, False, True, True) + PERMUTED_ELEMENT_FLOPS * 10 * 8192 * 3072
    )
    # Inside a network (the input wants a gradient) weight-centric training runs three matmuls, input-centric two
    # (W0 is frozen): at b=16 and d=3072 that saving outweighs moving 8192 activations through the permutations.
    assert inside < placement_cost(left, right, 8192, (True, True), True, True)
    assert layer.rotation_sides(["default"], 8192, training=True, input_needs_grad=True) == (False, False)
    # A first layer, or inference: the same matmuls either way, so moving the weight's d² beats 8192·d.
    assert layer.rotation_sides(["default"], 8192, training=True, input_needs_grad=False) == (True, True)
    assert layer.rotation_sides(["default"], 8192) == (True, True)


def saved_activations(model, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for the backward of model(x), other than parameters, buffers and x."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    shapes = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in own:
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).sum()  # a sum saves nothing of its own
    loss.backward()  # outside the hooks: what the backward rebuilds for itself is freed as it goes
    return shapes


@pytest.mark.parametrize("path", ["weight", "input", "auto"])
@pytest.mark.parametrize("mode, block", [("bs", 16), ("bs", 24), ("fs", 0.5)])
def test_a_training_step_saves_only_the_input_as_a_dense_linear_does(path, mode, block):
    config = POETConfig(block=block, mode=mode, forward_path=path, target_modules=["proj"])
    model = get_peft_model(OneLinear(64), config)
    randomize_skew(model, 0.1)
    x = torch.randn(32, 64, requires_grad=True)
    assert saved_activations(model, x) == []
    # 'store' keeps weight- or activation-sized rotated copies: what the default avoids.
    model.base_model.model.proj.poet_config["default"].memory_mode = "store"
    assert sum(math.prod(shape) for shape in saved_activations(model, x)) >= 32 * 64


class BiasedLinear(torch.nn.Module):
    """A 40→56 linear with a trained bias, or a transformers Conv1D (GPT-2's storage layout)."""

    def __init__(self, conv1d: bool):
        super().__init__()
        self.proj = Conv1D(56, 40) if conv1d else torch.nn.Linear(40, 56)
        torch.nn.init.normal_(self.proj.bias, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def step_gradients(model, x: torch.Tensor, autocast: bool = False, call=None) -> list[torch.Tensor]:
    """The gradients of x and of every trainable parameter after one backward of a fixed loss on (call or model)(x)."""
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = (call or model)(x)
    (output.float() * torch.linspace(-1, 1, output.shape[-1])).sin().sum().backward()
    grads = [x.grad, *(p.grad for p in model.parameters() if p.requires_grad)]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("base_dtype", [None, "bfloat16"], ids=["w0-fp32", "w0-bf16"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("path", ["weight", "input", "mixed", "mixed-other"])
@pytest.mark.parametrize("mode, block", [("bs", 16), ("fs", 0.5)], ids=["bs-remainder", "fs"])
def test_recomputed_gradients_equal_stored_ones_and_float64(mode, block, path, conv1d, base_dtype, monkeypatch):
    # b=16 leaves remainder blocks on both sides (40 = 2·16 + 8, 56 = 3·16 + 8); the bias trains, so its gradient
    # passes through R on the outputs too. A bf16 W0 in this float32 model is computed with in float32, so its
    # gradients equal the float64 reference of the same (bf16-valued) W0 as closely as a float32 W0's do.
    config = POETConfig(block=block, mode=mode, target_modules=["proj"], base_dtype=base_dtype)
    model = get_peft_model(BiasedLinear(conv1d), config)
    assert model.base_model.model.proj.get_base_layer().weight.dtype == getattr(torch, base_dtype or "float32")
    model.base_model.model.proj.get_base_layer().bias.requires_grad_(True)
    randomize_skew(model, 0.1)
    layer = model.base_model.model.proj
    sides = {"weight": (True, True), "input": (False, False), "mixed": (True, False), "mixed-other": (False, True)}
    monkeypatch.setattr(layer, "rotation_sides", lambda *args, **kwargs: sides[path])
    x = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(2))
    recomputed = step_gradients(model, x)
    layer.poet_config["default"].memory_mode = "store"
    stored = step_gradients(model, x)
    # The reference composes R·W0·P with autograd in float64 (`rotated_weight`), sharing nothing with the layer's
    # hand-written backward.
    bias = layer.get_base_layer().bias
    reference = step_gradients(
        model,
        x,
        call=lambda x: torch.nn.functional.linear(x.double(), layer.rotated_weight(["default"]), bias.double()),
    )
    assert len(recomputed) == 4  # x, bias, Q of R, Q of P
    for new, old, exact in zip(recomputed, stored, reference):
        scale = exact.abs().max()
        assert (new.double() - exact).abs().max() < 1e-5 * scale
        assert (new - old).abs().max() < 1e-5 * scale


def test_recomputed_gradients_hold_for_two_adapters_and_bf16(tokens):
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16), adapter_name="a")
    peft_model.add_adapter("b", POETConfig(block=0.5, mode="fs", seed=1))
    peft_model.base_model.set_adapter(["a", "b"])
    randomize_skew(peft_model, std=0.05)
    embeddings = peft_model.get_input_embeddings()(tokens).detach()
    body = peft_model.base_model.model.model

    def gradients(memory_mode: str, autocast: bool) -> list[torch.Tensor]:
        for layer in poet_peft.poet_layers(peft_model):
            layer.poet_config["a"].memory_mode = memory_mode
        return step_gradients(body, embeddings, autocast, call=lambda x: body(inputs_embeds=x).last_hidden_state)

    for autocast, tolerance in ((False, 1e-5), (True, 2e-2)):
        recomputed, stored = gradients("recompute", autocast), gradients("store", autocast)
        assert len(recomputed) == 1 + 4 * 14
        for new, old in zip(recomputed, stored):
            assert (new - old).abs().max() <= tolerance * old.abs().max()


def test_bf16_weights_train_with_float32_rotations(tokens):
    model = tiny_llama()
    reference_model = copy.deepcopy(model)
    peft_model = get_peft_model(model.to(torch.bfloat16), POETConfig(block=16))
    randomize_skew(peft_model, std=0.05)
    layer = next(poet_peft.poet_layers(peft_model))
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert all(param.dtype == torch.float32 for param in poet_peft.poet_parameters(peft_model))
    left, right = layer.rotations("default")
    assert left.blocks[0].dtype == right.blocks[0].dtype == torch.float32

    logits = outputs(peft_model, tokens)
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    grads = [param.grad for param in poet_peft.poet_parameters(peft_model)]
    assert all(grad.dtype == torch.float32 and torch.isfinite(grad).all() for grad in grads)
    assert any(grad.abs().sum() > 0 for grad in grads)

    fp32_model = get_peft_model(reference_model, POETConfig(block=16))
    randomize_skew(fp32_model, std=0.05)
    fp32_logits = outputs(fp32_model, tokens)
    assert (logits.float() - fp32_logits).abs().max() < 0.05 * fp32_logits.abs().max()


def test_permutations_are_seeded_per_layer_side_and_merge():
    first = get_peft_model(tiny_llama(), POETConfig(block=16, seed=3))
    second = get_peft_model(tiny_llama(seed=9), POETConfig(block=16, seed=3))
    other_seed = get_peft_model(tiny_llama(), POETConfig(block=16, seed=4))
    perms = [layer.poet_perm_in["default"].clone() for layer in poet_peft.poet_layers(first)]
    assert all(torch.equal(p, layer.poet_perm_in["default"]) for p, layer in zip(perms, poet_peft.poet_layers(second)))
    assert not torch.equal(perms[0], next(poet_peft.poet_layers(other_seed)).poet_perm_in["default"])
    assert not torch.equal(perms[0], perms[1])  # q_proj and k_proj of layer 0
    for perm in perms:
        assert torch.equal(perm.sort().values, torch.arange(perm.numel()))
    poet_peft.merge_and_reinit(first)
    assert not torch.equal(perms[0], next(poet_peft.poet_layers(first)).poet_perm_in["default"])


def test_fully_stochastic_subsets_cover_every_coordinate_over_merges():
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=0.25, mode="fs", target_modules=["q_proj"]))
    layer = next(poet_peft.poet_layers(peft_model))
    size = layer.poet_layouts["default"][1].covered
    assert size == 16  # ⌈0.25·64⌉
    seen = torch.zeros(64, dtype=torch.bool)
    for _ in range(40):
        subset = layer.poet_perm_in["default"][:size]
        assert subset.unique().numel() == size
        seen[subset] = True
        poet_peft.merge_and_reinit(peft_model)
    assert seen.all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block": 1}, r"block=1 is invalid for mode='bs'.*integer ≥ 2"),
        ({"block": 0.5}, r"block=0.5 is invalid for mode='bs'.*use mode='fs'"),
        ({"block": 1.5, "mode": "fs"}, r"block=1.5 is invalid for mode='fs'.*\(0, 1\]"),
        ({"block": 0.0, "mode": "fs"}, r"block=0.0 is invalid for mode='fs'.*\(0, 1\]"),
        ({"mode": "xs"}, r"mode='xs' is not a POET mode; valid: 'bs'.*'fs'"),
        ({"neumann_terms": -1}, r"neumann_terms=-1 is invalid: use an integer ≥ 0.*None"),
        ({"merge_every": 0}, r"merge_every=0 is invalid: use an integer ≥ 1.*None"),
        ({"init_weights": "kaiming"}, r"init_weights='kaiming'.*'normalized_gaussian', 'uniform_spectrum', 'xavier'"),
        ({"forward_path": "fast"}, r"forward_path='fast' is invalid; valid: 'auto', 'weight', 'input'"),
        ({"memory_mode": "save"}, r"memory_mode='save' is invalid; valid: 'recompute'.*'store'"),
    ],
)
def test_bad_config_values_raise_naming_the_field_value_and_valid_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_llama(), POETConfig(**kwargs))


@pytest.mark.parametrize(
    "config, error, message",
    [
        (
            POETConfig(block=128),
            ValueError,
            r"cannot wrap model\.layers\.0\.self_attn\.q_proj: block=128 is larger than its out_features \(64\)"
            r".*2 ≤ block ≤ 64",
        ),
        (
            POETConfig(block=0.01, mode="fs"),
            ValueError,
            r"cannot wrap model\.layers\.0\.self_attn\.q_proj: block=0.01.*fewer than 2",
        ),
        (
            POETConfig(target_modules=["embed_tokens"]),
            TypeError,
            r"cannot wrap model\.embed_tokens: it is a Embedding.*Linear.*q_proj",
        ),
        (POETConfig(target_modules=["qproj"]), ValueError, r"qproj.*not found.*named: down_proj, gate_proj, .*q_proj"),
    ],
    ids=["block-too-large", "fraction-too-small", "not-a-linear", "no-match"],
)
def test_bad_targets_raise_at_get_peft_model_naming_the_module(config, error, message):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        get_peft_model(model, config)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items() if key in before)


def test_unknown_architecture_without_targets_lists_its_linear_layers():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.encoder(x)

    with pytest.raises(ValueError, match=r"no default targets for model_type='custom'.*'all-linear'.*named: encoder"):
        get_peft_model(Tiny(), POETConfig(block=4))
    wrapped = get_peft_model(Tiny(), POETConfig(block=4, target_modules=["encoder"]))
    assert wrapped.get_nb_trainable_parameters()[0] == 2 * 2 * 6


def test_two_active_adapters_compose_like_merging_both(tokens):
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16), adapter_name="a")
    peft_model.add_adapter("b", POETConfig(block=0.5, mode="fs", seed=1))
    peft_model.base_model.set_adapter(["a", "b"])
    randomize_skew(peft_model, std=0.05)
    reference = float64_reference(peft_model, tokens)
    for path in ("weight", "input", "auto"):
        for layer in poet_peft.poet_layers(peft_model):
            layer.poet_config["a"].forward_path = path
        assert (outputs(peft_model, tokens).double() - reference).abs().max() < 1e-5 * reference.abs().max()


def test_inference_mode_then_training_works(tokens):
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16))
    with torch.inference_mode():
        outputs(peft_model, tokens)
    outputs(peft_model, tokens).square().mean().backward()
    assert all(param.grad is not None for param in poet_peft.poet_parameters(peft_model))


def test_rotations_stay_float32_under_bf16_autocast(tokens):
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16))
    randomize_skew(peft_model, std=0.05)
    layer = next(poet_peft.poet_layers(peft_model))
    left, _ = layer.rotations("default")
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        left_autocast, _ = layer.rotations("default")
        rotated = left_autocast.apply(x)
    assert torch.equal(left_autocast.blocks[0], left.blocks[0])
    assert torch.equal(rotated, left.apply(x))


def test_a_bad_target_found_late_leaves_the_model_untouched():
    model = tiny_llama(ffn=48)  # gate/up/down have a 48-wide side, smaller than the block
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"mlp\.gate_proj: block=56 is larger than its out_features \(48\)"):
        get_peft_model(model, POETConfig(block=56, init_weights="normalized_gaussian"))
    assert not any(isinstance(module, poet_peft.POETLinear) for module in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_torch_compile_trains_with_the_recomputing_backward(tokens):
    eager = get_peft_model(tiny_llama(), POETConfig(block=16))
    randomize_skew(eager, std=0.05)
    compiled = copy.deepcopy(eager)
    eager(input_ids=tokens, labels=tokens).loss.backward()
    torch.compile(compiled, backend="aot_eager")(input_ids=tokens, labels=tokens).loss.backward()
    pairs = [(a.grad, b.grad) for a, b in zip(eager.parameters(), compiled.parameters()) if a.requires_grad]
    assert len(pairs) == 28
    for expected, actual in pairs:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7)
