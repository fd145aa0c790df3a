"""E4's extraction W = R + U·C·Vᵀ, its gradient projection, adding optimizer groups mid-run, and stable directions."""

from __future__ import annotations

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
    with pytest.raises(TypeError, match="LambdaLR-style"):
        poet_peft.add_param_group(optimizer, {"params": [], "lr": 1.0}, torch.optim.lr_scheduler.StepLR(optimizer, 1))


def test_stable_directions_measure_the_momentum_subspace_and_amplify_inside_it(tokens):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = poet_peft.StableDirections(model, optimizer, ["q_proj"], k=3, every=2, amplify=4.0)
    assert tracker.after_step(1) == {}
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
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
    # 3B: the gradient's component inside the tracked block is multiplied by α = 4, the rest is untouched.
    reference = tiny_llama()
    reference.load_state_dict(model.state_dict())
    reference(input_ids=tokens, labels=tokens).loss.backward()
    model(input_ids=tokens, labels=tokens).loss.backward()
    u, v = (t.double() for t in tracker.subspaces[name])
    plain = reference.get_submodule(name).weight.grad.double()
    expected = plain + 3.0 * u @ (u.t() @ plain @ v) @ v.t()
    torch.testing.assert_close(model.get_submodule(name).weight.grad.double(), expected, rtol=1e-5, atol=1e-8)
    tracker.remove()
    model.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    torch.testing.assert_close(model.get_submodule(name).weight.grad, reference.get_submodule(name).weight.grad)
