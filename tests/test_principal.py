"""E4's extraction W = R + U·C·Vᵀ, its gradient projection, adding optimizer groups mid-run, and stable directions."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import outputs, tiny_llama
from transformers import get_scheduler

import poet_peft
from poet_peft.ops.spectral import principal_cosines, projection_energy, top_singular

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def linear_weights(model) -> dict[str, torch.Tensor]:
    """Each target Linear's weight, by module name."""
    return {name: linear.weight.detach().clone() for name, linear in poet_peft.matching_linears(model, TARGETS)}


def test_top_singular_and_principal_cosines_against_float64_references():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(30, 20, generator=generator, dtype=torch.float64)
    left, values, right = top_singular(matrix, 5)
    torch.testing.assert_close(values, torch.linalg.svdvals(matrix)[:5])
    torch.testing.assert_close(left.t() @ matrix @ right, torch.diag(values))
    assert principal_cosines(left, left).tolist() == pytest.approx([1.0] * 5)
    rest = torch.linalg.svd(matrix, full_matrices=False).U[:, 5:10]
    assert principal_cosines(left, rest).max().item() < 1e-12  # orthogonal subspaces
    # The share of energy in the top-5 block is Σ_{i≤5} σᵢ² / Σ σᵢ².
    energies = torch.linalg.svdvals(matrix).square()
    assert projection_energy(matrix, left, right) == pytest.approx((energies[:5].sum() / energies.sum()).item())
    big = (
        torch.randn(1500, 40, generator=generator, dtype=torch.float64) @ torch.diag(0.7 ** torch.arange(40.0)).double()
    )
    _, big_values, _ = top_singular(big, 4)  # randomized path
    torch.testing.assert_close(big_values, torch.linalg.svdvals(big)[:4], rtol=1e-8, atol=0)


@pytest.mark.parametrize("subspace", ["svd", "random"])
def test_extraction_preserves_the_models_function(subspace, tokens):
    model = tiny_llama()
    reference = outputs(model, tokens)
    weights = linear_weights(model)
    names = poet_peft.extract_principal(model, 4, TARGETS, subspace=subspace)
    assert len(names) == 14
    torch.testing.assert_close(outputs(model, tokens), reference, rtol=0, atol=1e-6)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, poet_peft.PrincipalLinear)
        assert not layer.principal_u.requires_grad and layer.core.requires_grad
        torch.testing.assert_close(layer.effective_weight(), weights[name], rtol=0, atol=1e-6)
        eye = torch.eye(4)
        torch.testing.assert_close(layer.principal_u.t() @ layer.principal_u, eye, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.principal_v.t() @ layer.principal_v, eye, rtol=0, atol=1e-6)
        if subspace == "svd":  # C = diag(S_k), and R has no U–V block left
            torch.testing.assert_close(layer.core, torch.diag(torch.linalg.svdvals(weights[name])[:4]))
            block = layer.principal_u.t() @ layer.residual.weight @ layer.principal_v
            assert block.abs().max().item() < 1e-5


def test_svd_split_is_exact_on_large_flat_spectra_and_randomized_tracking_is_seeded():
    # A Gaussian 1100×48 weight has a flat spectrum, where a randomized SVD would miss the top directions.
    layer = torch.nn.Linear(48, 1100)
    model = torch.nn.Sequential(layer)
    weight = layer.weight.detach().clone()
    poet_peft.extract_principal(model, 6, ["0"])
    torch.testing.assert_close(model[0].core.double(), torch.diag(torch.linalg.svdvals(weight.double())[:6]))
    state = torch.get_rng_state()
    big = torch.randn(1200, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = top_singular(big, 4, torch.Generator().manual_seed(5))
    second = top_singular(big, 4, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and torch.equal(torch.get_rng_state(), state)


def test_extraction_projects_the_warm_up_momentum_and_keeps_u_v_c_in_float32(tokens):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    poet_peft.extract_principal(model, 4, ["q_proj"], optimizer=optimizer)
    layer = model.model.layers[0].self_attn.q_proj
    momentum = optimizer.state[layer.residual.weight]["exp_avg"]
    assert (layer.principal_u.t() @ momentum @ layer.principal_v).abs().max().item() < 1e-9
    assert momentum.abs().max().item() > 1e-5  # the rest of it is kept
    half = tiny_llama().to(torch.bfloat16)
    poet_peft.extract_principal(half, 4, ["q_proj"])
    layer = half.model.layers[0].self_attn.q_proj
    assert {layer.principal_u.dtype, layer.principal_v.dtype, layer.core.dtype} == {torch.float32}
    assert outputs(half, tokens).dtype == torch.bfloat16
    half(input_ids=tokens, labels=tokens).loss.backward()
    gradient = layer.residual.weight.grad.float()
    assert (layer.principal_u.t() @ gradient @ layer.principal_v).abs().max() < 1e-2 * gradient.abs().max()


def test_residual_gradient_is_projected_and_the_core_learns_the_block(tokens):
    reference_model = tiny_llama()
    reference_model(input_ids=tokens, labels=tokens).loss.backward()
    full_gradients = {name: linear.weight.grad for name, linear in poet_peft.matching_linears(reference_model, TARGETS)}
    model = tiny_llama()
    names = poet_peft.extract_principal(model, 4, TARGETS)
    model(input_ids=tokens, labels=tokens).loss.backward()
    for name in names:
        layer = model.get_submodule(name)
        u, v, gradient = layer.principal_u.double(), layer.principal_v.double(), full_gradients[name].double()
        residual_gradient = layer.residual.weight.grad.double()
        # Zero up to float32 rounding, where the unprojected block is of the gradient's own size.
        assert (u.t() @ gradient @ v).abs().max().item() > 1e-2 * gradient.abs().max().item()
        assert (u.t() @ residual_gradient @ v).abs().max().item() < 1e-6 * gradient.abs().max().item()
        torch.testing.assert_close(
            residual_gradient, gradient - u @ (u.t() @ gradient @ v) @ v.t(), rtol=1e-4, atol=1e-7
        )
        torch.testing.assert_close(layer.core.grad.double(), u.t() @ gradient @ v, rtol=1e-4, atol=1e-7)


def test_fold_returns_plain_linears_with_the_trained_weight(tokens):
    model = tiny_llama()
    poet_peft.extract_principal(model, 4, ["q_proj", "down_proj"])
    with torch.no_grad():
        for core in poet_peft.principal_cores(model):
            core.add_(0.3)
    trained = outputs(model, tokens)
    assert poet_peft.fold_principal(model) == 4
    assert not list(poet_peft.principal_cores(model))
    assert all(type(m) is torch.nn.Linear for _, m in poet_peft.matching_linears(model, ["q_proj", "down_proj"]))
    torch.testing.assert_close(outputs(model, tokens), trained, rtol=0, atol=1e-6)
    assert set(model.state_dict()) == set(tiny_llama().state_dict())  # loads into plain Transformers


def test_extraction_refuses_bad_input_and_changes_nothing():
    model = tiny_llama()
    before = {name: param.clone() for name, param in model.state_dict().items()}
    with pytest.raises(ValueError, match="subspace='pca'.*'svd' or 'random'"):
        poet_peft.extract_principal(model, 4, TARGETS, subspace="pca")
    with pytest.raises(ValueError, match="no nn.Linear layer matches.*named: .*q_proj"):
        poet_peft.extract_principal(model, 4, ["qkv"])
    with pytest.raises(ValueError, match=r"k=65 does not fit .*q_proj \(64×64\); use 1 ≤ k ≤ 64"):
        poet_peft.extract_principal(model, 65, TARGETS)
    assert all(torch.equal(param, before[name]) for name, param in model.state_dict().items())


def test_added_group_follows_the_schedule_and_keeps_moved_parameters_state(tokens):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(poet_peft.create_param_groups(model, lr=1e-2, weight_decay=0.1))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=20)
    for _ in range(5):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    weights = [linear.weight for _, linear in poet_peft.matching_linears(model, ["q_proj"])]
    state_before = optimizer.state[weights[0]]["exp_avg"].clone()
    poet_peft.add_param_group(optimizer, {"params": weights, "lr": 5e-2, "weight_decay": 0.0}, scheduler)
    assert not any(w is p for w in weights for p in optimizer.param_groups[0]["params"])
    assert torch.equal(optimizer.state[weights[0]]["exp_avg"], state_before)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(5e-2 * factor)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    factor = optimizer.param_groups[0]["lr"] / 1e-2
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(5e-2 * factor)
    # A refused group changes nothing: the parameters stay in their groups and keep training.
    groups_before = [list(group["params"]) for group in optimizer.param_groups]
    down = [linear.weight for _, linear in poet_peft.matching_linears(model, ["down_proj"])]
    with pytest.raises(TypeError, match="LambdaLR-style"):
        poet_peft.add_param_group(optimizer, {"params": down, "lr": 1.0}, torch.optim.lr_scheduler.StepLR(optimizer, 1))
    with pytest.raises(ValueError, match="needs a group with 'params' and 'lr'"):
        poet_peft.add_param_group(optimizer, {"params": down}, scheduler)
    assert [list(group["params"]) for group in optimizer.param_groups] == groups_before
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == len(optimizer.param_groups)


def adam_step(model, optimizer, tokens) -> None:
    """One AdamW step on the causal-LM loss of `tokens`."""
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_stable_directions_measure_the_momentum_subspace_and_amplify_the_update_inside_it(tokens):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    adam_step(model, optimizer, tokens)
    reference, reference_optimizer = copy.deepcopy((model, optimizer))
    tracker = poet_peft.StableDirections(model, optimizer, ["q_proj"], k=3, every=2, amplify=4.0)
    assert tracker.after_step(1) == {}
    name = "model.layers.0.self_attn.q_proj"
    momentum = optimizer.state[model.get_submodule(name).weight]["exp_avg"].double()
    first = tracker.after_step(2)
    energies = torch.linalg.svdvals(momentum).square()
    assert first[f"stable/{name}/p"] == pytest.approx((energies[:3].sum() / energies.sum()).item(), rel=1e-9)
    assert f"stable/{name}/cos_u_mean" not in first  # nothing to compare with yet
    second = tracker.measure()  # same momentum: the subspace has not moved
    assert second[f"stable/{name}/cos_u_mean"] == pytest.approx(1.0)
    assert second[f"stable/{name}/p_prev"] == pytest.approx(second[f"stable/{name}/p"])
    assert poet_peft.summarize_directions(second)["stable/p"] == pytest.approx(
        sum(value for key, value in second.items() if key.endswith("/p")) / 2
    )
    # 3B: the step's update inside the tracked block is α = 4 times Adam's, the rest of it is Adam's own.
    before = {key: value.clone() for key, value in model.state_dict().items()}
    adam_step(model, optimizer, tokens)
    adam_step(reference, reference_optimizer, tokens)
    assert len(tracker.subspaces) == 2  # both layers' q_proj
    for key, value in model.state_dict().items():
        plain = reference.state_dict()[key].double() - before[key].double()
        expected = plain
        if key.removesuffix(".weight") in tracker.subspaces:
            u, v = (t.double() for t in tracker.subspaces[key.removesuffix(".weight")])
            expected = plain + 3.0 * u @ (u.t() @ plain @ v) @ v.t()
        torch.testing.assert_close(value.double() - before[key].double(), expected, rtol=1e-4, atol=1e-8)
    u, v = (t.double() for t in tracker.subspaces[name])
    assert (u.t() @ (model.get_submodule(name).weight.double() - before[name + ".weight"].double()) @ v).abs().max() > 0
    # The subspaces round-trip through state_dict, for checkpoints; remove() stops amplifying.
    restored = poet_peft.StableDirections(reference, reference_optimizer, ["q_proj"], k=3, every=2)
    restored.load_state_dict(tracker.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.subspaces[name], tracker.subspaces[name]))
    tracker.remove()
    assert not optimizer._optimizer_step_post_hooks
