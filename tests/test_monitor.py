"""SpectralMonitor: each metric against a direct float64 computation, and the Trainer, Accelerate and JSONL paths."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from conftest import accelerate_launch, randomize_skew, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn

import poet_peft
from poet_peft.ops.orthogonal import random_orthogonal, skew_from_packed
from poet_peft.ops.spectral import hyperspherical_energy, principal_cosines

ROOT = Path(__file__).resolve().parents[1]
CPU_DDP_CONFIG = ROOT / "examples" / "configs" / "cpu_ddp.yaml"
LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def direct_energy(matrix: torch.Tensor) -> float:
    """Σ_{i≠j} 1/‖ŵᵢ − ŵⱼ‖ by an explicit double loop over row pairs, in float64."""
    rows = matrix.double() / matrix.double().norm(dim=1, keepdim=True)
    n = rows.shape[0]
    return sum(1 / (rows[i] - rows[j]).norm().item() for i in range(n) for j in range(n) if i != j)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------- the numerics
def test_hyperspherical_energy_matches_the_pairwise_sum_and_ignores_a_shared_rotation():
    weight = torch.randn(12, 7, generator=generator(), dtype=torch.float64)
    assert hyperspherical_energy(weight) == pytest.approx(direct_energy(weight), rel=1e-12)
    assert hyperspherical_energy(weight, rows_per_chunk=5) == pytest.approx(direct_energy(weight), rel=1e-12)
    rotation = random_orthogonal(7, 7, generator(1))
    assert hyperspherical_energy(weight @ rotation) == pytest.approx(hyperspherical_energy(weight), rel=1e-12)
    assert hyperspherical_energy(weight.float() * 3) == pytest.approx(direct_energy(weight), rel=1e-5)  # scale-free
    skew = torch.diag(torch.linspace(1, 3, 7, dtype=torch.float64))  # not a rotation: the energy moves
    assert abs(hyperspherical_energy(weight @ skew) / hyperspherical_energy(weight) - 1) > 1e-3


def test_principal_cosines_are_one_for_the_same_subspace_zero_for_orthogonal_ones_and_cos_theta_between():
    basis = random_orthogonal(10, 3, generator())
    mixed = basis @ random_orthogonal(3, 3, generator(1))  # another basis of the same span
    assert torch.allclose(principal_cosines(basis, mixed), torch.ones(3, dtype=torch.float64), atol=1e-12)
    full = random_orthogonal(10, 10, generator(2))
    assert principal_cosines(full[:, :3], full[:, 3:6]).abs().max() < 1e-12
    theta = 0.3
    tilted = math.cos(theta) * full[:, :1] + math.sin(theta) * full[:, 1:2]
    assert principal_cosines(full[:, :1], tilted).item() == pytest.approx(math.cos(theta), abs=1e-12)


@pytest.mark.parametrize("terms", [2, 3])
def test_poet_orthogonality_error_grows_with_q_as_cayley_neumann_predicts(terms):
    """R_k = R·(I − Q^{k+1}) exactly, so R_k·R_kᵀ − I = (I − Q^{k+1})(I − (−Q)^{k+1}) − I, of order ‖Q‖^{k+1}."""
    base = nn.Sequential(nn.Linear(16, 16))
    model = get_peft_model(base, poet_peft.POETConfig(block=16, neumann_terms=terms, target_modules=["0"]))
    layer = next(poet_peft.poet_layers(model))
    skew_r = torch.randn_like(layer.poet_R["default"], generator=generator(3))
    skew_p = torch.randn_like(layer.poet_P["default"], generator=generator(4))
    errors = []
    for scale in (0.01, 0.02, 0.04):
        with torch.no_grad():
            layer.poet_R["default"].copy_(skew_r * scale)
            layer.poet_P["default"].copy_(skew_p * scale)
        measured = layer.orthogonality_errors()
        for packed, error in zip((skew_r, skew_p), measured):
            q = skew_from_packed(packed.double() * scale, 16)
            power = torch.linalg.matrix_power(q, terms + 1)
            eye = torch.eye(16, dtype=torch.float64)
            expected = torch.linalg.matrix_norm((eye - power) @ (eye - (-1) ** (terms + 1) * power) - eye).item()
            assert error == pytest.approx(expected, rel=1e-6)
        errors.append(measured[0])
    order = (terms + 1) if terms % 2 else 2 * (terms + 1)  # even k: the leading terms cancel
    slopes = [math.log2(errors[i + 1] / errors[i]) for i in range(2)]
    assert slopes == pytest.approx([order, order], abs=0.05)
    exact = get_peft_model(
        nn.Sequential(nn.Linear(16, 16)), poet_peft.POETConfig(block=16, neumann_terms=None, target_modules=["0"])
    )
    randomize_skew(exact, 0.3)
    assert max(next(poet_peft.poet_layers(exact)).orthogonality_errors()) < 1e-13


# ------------------------------------------------------------------------------------------------ the monitor
def svd64(matrix: torch.Tensor, k: int):
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    return u[:, :k], s[:k], vh[:k].t()


def test_weight_metrics_match_float64_svds_of_the_weights():
    model = tiny_llama()
    monitor = poet_peft.SpectralMonitor(LLAMA_TARGETS, every=1, topk=4).bind(model)
    name = "model.layers.0.mlp.down_proj"
    weight = model.get_submodule(name).weight
    start = weight.detach().double().clone()
    first = monitor.measure(0)
    with torch.no_grad():
        weight.add_(0.05 * torch.randn(weight.shape, generator=generator(5)))
    second = monitor.measure(1)
    (u0, s0, v0), (u1, s1, v1) = svd64(start, 4), svd64(weight, 4)
    prefix = f"spec/{name}/"
    assert second[prefix + "sigma_max"] == pytest.approx(s1[0].item(), rel=1e-12)
    assert [second[f"{prefix}sv{i}"] for i in range(1, 5)] == pytest.approx(s1.tolist(), rel=1e-12)
    assert second[prefix + "delta_sv_rel"] == pytest.approx(((s1 - s0).norm() / s0.norm()).item(), rel=1e-10)
    assert second[prefix + "spectrum_drift"] == pytest.approx(second[prefix + "delta_sv_rel"], rel=1e-12)
    for side, (old, new) in (("u", (u0, u1)), ("v", (v0, v1))):
        cosines = torch.linalg.svdvals(old.t() @ new)
        assert [second[f"{prefix}cos_{side}{i}"] for i in range(1, 5)] == pytest.approx(cosines.tolist(), abs=1e-10)
        assert second[f"{prefix}cos_{side}_max"] == pytest.approx(cosines.max().item(), abs=1e-10)
        assert second[f"{prefix}cos_{side}_mean"] == pytest.approx(cosines.mean().item(), abs=1e-10)
    assert second[prefix + "hyperspherical_energy"] == pytest.approx(direct_energy(weight.detach()), rel=1e-10)
    assert first[prefix + "spectrum_drift"] == 0 and prefix + "cos_u1" not in first  # nothing to compare with yet
    assert len([key for key in second if key.endswith("/sigma_max")]) == 14 and second["spec/seconds"] > 0
    untouched = "spec/model.layers.1.mlp.down_proj/"
    assert second[untouched + "cos_u_mean"] == pytest.approx(1) and second[untouched + "delta_sv_rel"] < 1e-14


def test_a_poet_model_logs_its_effective_weight_under_the_plain_model_names():
    plain = tiny_llama()
    model = get_peft_model(tiny_llama(), poet_peft.POETConfig(block=16))
    randomize_skew(model, 0.05)
    measured = poet_peft.SpectralMonitor("q_proj,down_proj", every=1, topk=3).bind(model).measure(1)
    plain_keys = poet_peft.SpectralMonitor("q_proj,down_proj", every=1, topk=3).bind(plain).measure(1).keys()
    assert set(plain_keys) <= set(measured)  # the same names, plus POET's own metrics
    merged = model.merge_and_unload()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        values = torch.linalg.svdvals(merged.get_submodule(name).weight.double())
        assert [measured[f"spec/{name}/sv{i}"] for i in (1, 2, 3)] == pytest.approx(values[:3].tolist(), rel=1e-6)
        assert measured[f"spec/{name}/orth_err_R"] > 0 and measured[f"spec/{name}/orth_err_P"] > 0
        # R·W0·P with orthogonal factors keeps W0's singular values: only Neumann's truncation moves them.
        assert measured[f"spec/{name}/spectrum_drift"] < 1e-4


def test_a_foreign_peft_layer_is_read_through_its_outputs():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["v_proj"], lora_dropout=0.5))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=generator(6))
    model.train()
    monitor = poet_peft.SpectralMonitor("v_proj", every=1, topk=2).bind(model)
    measured = monitor.measure(1)
    assert model.training  # the probe switched dropout off and back
    expected = torch.linalg.svdvals(model.merge_and_unload().model.layers[0].self_attn.v_proj.weight.double())
    assert measured["spec/model.layers.0.self_attn.v_proj/sigma_max"] == pytest.approx(expected[0].item(), rel=1e-5)


def trained_pair(source: str):
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    monitor = poet_peft.SpectralMonitor(["0", "2"], every=1, topk=2, source=source).bind(model, optimizer)
    for seed in range(2):
        model(torch.randn(8, 5, generator=generator(seed))).square().mean().backward()
        optimizer.step()
    return model, optimizer, monitor


@pytest.mark.parametrize("source", ["grad", "momentum"])
def test_grad_and_momentum_sources_decompose_what_the_optimizer_holds(source):
    torch.manual_seed(0)
    model, optimizer, monitor = trained_pair(source)
    measured = monitor.measure(2)
    weight = model[2].weight
    matrix = weight.grad if source == "grad" else optimizer.state[weight]["exp_avg"]
    expected = torch.linalg.svdvals(matrix.double())
    assert [measured["spec/2/sv1"], measured["spec/2/sv2"]] == pytest.approx(expected[:2].tolist(), rel=1e-10)
    assert "spec/2/spectrum_drift" not in measured and "spec/2/hyperspherical_energy" not in measured


def test_large_matrices_take_a_seeded_randomized_svd_that_leaves_the_global_rng_alone():
    linear = nn.Linear(40, 1100, bias=False)
    left = random_orthogonal(1100, 40, generator(1))
    right = random_orthogonal(40, 40, generator(2))
    spectrum = torch.logspace(0, -3, 40, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_((left * spectrum) @ right.t())
    model = nn.Sequential(linear)
    monitor = poet_peft.SpectralMonitor("0", every=1, topk=4).bind(model)
    state = torch.get_rng_state()
    measured = monitor.measure(7)
    assert torch.equal(torch.get_rng_state(), state)
    assert [measured[f"spec/0/sv{i}"] for i in range(1, 5)] == pytest.approx(spectrum[:4].tolist(), rel=1e-5)
    again = poet_peft.SpectralMonitor("0", every=1, topk=4).bind(model).measure(7)
    assert [again[f"spec/0/sv{i}"] for i in range(1, 5)] == [measured[f"spec/0/sv{i}"] for i in range(1, 5)]


def test_bad_input_names_the_problem_and_the_choices():
    model = tiny_llama()
    with pytest.raises(ValueError, match="source='svd' is not valid; use one of weight, grad, momentum"):
        poet_peft.SpectralMonitor("q_proj", source="svd")
    with pytest.raises(ValueError, match="every=0 and topk=8 must both be ≥ 1"):
        poet_peft.SpectralMonitor("q_proj", every=0)
    with pytest.raises(ValueError, match="empty pattern"):
        poet_peft.SpectralMonitor("q_proj,")
    with pytest.raises(ValueError, match="no module matches targets attn.qkv.*named: .*down_proj"):
        poet_peft.SpectralMonitor("attn.qkv").bind(model)
    with pytest.raises(ValueError, match="pass the optimizer"):
        poet_peft.SpectralMonitor("q_proj", source="momentum").bind(model)
    poet = get_peft_model(tiny_llama(), poet_peft.POETConfig(block=16))
    with pytest.raises(ValueError, match="source='grad' needs model.layers.0.self_attn.q_proj's own weight to train"):
        poet_peft.SpectralMonitor("q_proj", source="grad").bind(poet)
    with pytest.raises(RuntimeError, match="call bind"):
        poet_peft.SpectralMonitor("q_proj").measure(0)


def test_glob_patterns_and_nested_modules():
    model = get_peft_model(tiny_llama(), poet_peft.POETConfig(block=16))
    monitor = poet_peft.SpectralMonitor("layers.1.*").bind(model)
    assert sorted(monitor.modules) == sorted(f"model.layers.1.{n}" for n in [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ])  # fmt: skip
    assert all(isinstance(module, poet_peft.POETLinear) for module in monitor.modules.values())


# ------------------------------------------------------------------------------------------------ the loggers
def test_accelerate_call_logs_to_trackers_or_falls_back_to_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_llama()
    bare = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path / "bare")))
    monitor = poet_peft.SpectralMonitor("down_proj", every=2, topk=2).bind(model)
    assert monitor.after_step(1, bare) == {}
    logged = monitor.after_step(2, bare)
    lines = [json.loads(line) for line in (tmp_path / "bare" / "spectral_metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 2, **logged}]

    tracked = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path / "tb"))
    tracked.init_trackers("monitor")
    logged = monitor.after_step(4, tracked)
    tracked.end_training()
    assert not (tmp_path / "tb" / "spectral_metrics.jsonl").exists()
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent)).Reload()
    key = "spec/model.layers.0.mlp.down_proj/sigma_max"
    assert [(event.step, event.value) for event in events.Scalars(key)] == [(4, pytest.approx(logged[key], rel=1e-6))]


def test_jsonl_log_refuses_to_overwrite_and_drops_lines_after_a_resume_point(tmp_path):
    path = tmp_path / "m.jsonl"
    log = poet_peft.monitor.JsonlLog(path)
    for step in (0, 10, 20):
        log.log({"x": step}, step)
    with pytest.raises(FileExistsError, match="holds the metrics of an earlier run"):
        poet_peft.monitor.JsonlLog(path)
    assert len(path.read_text().splitlines()) == 3  # nothing lost
    poet_peft.monitor.JsonlLog(path, resume_step=10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 10]


def test_only_the_main_process_measures_under_ddp(tmp_path):
    command = [*accelerate_launch(CPU_DDP_CONFIG), str(ROOT / "tests" / "monitor_ranks.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "rank0.json").read_text()) == [2, 4]
    assert json.loads((tmp_path / "rank1.json").read_text()) == []
    lines = [json.loads(line) for line in (tmp_path / "spectral_metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4] and "spec/2/cos_u_mean" in lines[1]


def tiny_trainer(model: nn.Module, output_dir: Path, steps: int, logging_steps: int = 100):
    """A CPU Trainer over 16 random sequences, with no tracker, checkpoint or progress bar."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 128, (16, 12), generator=generator(7))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=logging_steps,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=data)


def test_trainer_callback_logs_through_trainer_and_jsonl(tmp_path):
    trainer = tiny_trainer(tiny_llama().train(), tmp_path, steps=4)
    monitor = poet_peft.SpectralMonitor("down_proj", every=2, topk=2, source="grad")
    trainer.add_callback(poet_peft.SpectralMonitorCallback(trainer, monitor))
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "spectral_metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]  # no gradient before the first step: nothing at 0
    history = [entry for entry in trainer.state.log_history if "spec/seconds" in entry]
    assert [entry["step"] for entry in history] == [2, 4]
    key = "spec/model.layers.1.mlp.down_proj/cos_u_mean"
    assert history[1][key] == lines[1][key] and 0 <= lines[1][key] <= 1


def test_trainer_callback_leaves_trainer_logging_as_it_was_and_prints_one_line(tmp_path, capsys):
    def losses(monitored: bool) -> list[float]:
        torch.manual_seed(0)
        trainer = tiny_trainer(tiny_llama().train(), tmp_path / str(monitored), steps=4, logging_steps=2)
        if monitored:
            monitor = poet_peft.SpectralMonitor("q_proj", every=2, topk=2)
            trainer.add_callback(poet_peft.SpectralMonitorCallback(trainer, monitor))
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    plain = losses(False)
    capsys.readouterr()
    assert losses(True) == plain and len(plain) == 2  # Trainer's own loss logs at steps 2 and 4, unchanged
    printed = [line for line in capsys.readouterr().out.splitlines() if "spec" in line]
    assert [line.split(":")[0] for line in printed] == [f"spectral monitor, step {step}" for step in (0, 2, 4)]
    assert all(len(line) < 160 and "largest σ_max" in line for line in printed)


def test_a_second_trainer_run_in_the_same_folder_keeps_the_first_ones_metrics_aside(tmp_path):
    for _ in range(2):
        trainer = tiny_trainer(tiny_llama().train(), tmp_path, steps=2)
        trainer.add_callback(poet_peft.SpectralMonitorCallback(trainer, poet_peft.SpectralMonitor("q_proj", every=2)))
        trainer.train()
    (earlier,) = tmp_path.glob("spectral_metrics.before-*.jsonl")
    for path in (earlier, tmp_path / "spectral_metrics.jsonl"):
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 2]


def test_trainer_callback_with_weights_measures_step_zero(tmp_path):
    trainer = tiny_trainer(get_peft_model(tiny_llama().train(), poet_peft.POETConfig(block=16)), tmp_path, steps=2)
    trainer.add_callback(poet_peft.SpectralMonitorCallback(trainer, poet_peft.SpectralMonitor("q_proj", every=2)))
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "spectral_metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2]
    key = "spec/model.layers.0.self_attn.q_proj/"
    assert lines[0][key + "orth_err_R"] == 0 and lines[1][key + "orth_err_R"] > 0
    assert lines[1][key + "spectrum_drift"] < 1e-3


# ------------------------------------------------------------------------------------------------- the plot command
def test_plot_command_rejects_bad_input_with_a_clear_message(tmp_path, capsys):
    import poet_peft_cli as cli

    plain = tmp_path / "run" / "metrics.jsonl"
    plain.parent.mkdir()
    plain.write_text('{"step": 1, "train/loss": 3.0}\n')
    cases = [
        ([str(tmp_path / "missing.jsonl")], "missing.jsonl: no such metrics file"),
        ([str(plain)], "has no spectral metrics (spec/<module>/…). Log them with --spec-monitor"),
        ([str(plain), str(plain), "--labels", "a"], "--labels gives 1 names (a) for 2 metrics files"),
    ]
    for arguments, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["plot", *arguments, "-o", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    plain.write_text("not json\n")
    with pytest.raises(SystemExit):
        cli.main(["plot", str(plain), "-o", str(tmp_path / "out")])
    assert "is not a metrics JSONL file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


# ----------------------------------------------------------------------------------- robustness (review findings)
def test_the_probe_is_exact_for_a_bf16_layer_with_a_large_bias():
    base = nn.Sequential(nn.Linear(64, 48))
    with torch.no_grad():
        base[0].bias.fill_(4.0)
    model = get_peft_model(base.to(torch.bfloat16), LoraConfig(r=4, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1, generator=generator(9))
    expected = layer.base_layer.weight.double() + layer.scaling["default"] * (
        layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    )
    measured = poet_peft.SpectralMonitor("0", every=1, topk=8).bind(model).measure(1)
    values = torch.linalg.svdvals(expected)[:8].tolist()
    assert [measured[f"spec/0/sv{i}"] for i in range(1, 9)] == pytest.approx(values, rel=1e-9)


def test_a_non_finite_matrix_is_reported_and_training_goes_on():
    model = tiny_llama()
    monitor = poet_peft.SpectralMonitor("down_proj", every=1, topk=2).bind(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    measured = monitor.measure(1)
    assert measured["spec/model.layers.0.mlp.down_proj/nonfinite"] == 1.0
    assert "spec/model.layers.1.mlp.down_proj/sigma_max" in measured


def test_unreadable_targets_and_a_changed_topk_are_refused():
    lora_embedding = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="cannot read model.embed_tokens: it is a Embedding adapter over a Embedding"):
        poet_peft.SpectralMonitor("embed_tokens").bind(lora_embedding)
    state = poet_peft.SpectralMonitor("q_proj", topk=4).bind(tiny_llama()).state_dict()
    with pytest.raises(ValueError, match="saved state has topk=4, this monitor topk=2"):
        poet_peft.SpectralMonitor("q_proj", topk=2).load_state_dict(state)


def test_a_restored_monitor_continues_its_fallback_jsonl(tmp_path):
    model = tiny_llama()
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path)))
    first = poet_peft.SpectralMonitor("down_proj", every=2, topk=2).bind(model)
    for step in (2, 4):
        first.after_step(step, accelerator)
    state = first.state_dict()  # a checkpoint after step 4; the run then logged step 6 and crashed mid-line
    first.after_step(6, accelerator)
    with (tmp_path / "spectral_metrics.jsonl").open("a") as handle:
        handle.write('{"step": 8, "spec/mod')
    resumed = poet_peft.SpectralMonitor("down_proj", every=2, topk=2).bind(model)
    resumed.load_state_dict(state)
    resumed.after_step(6, Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path))))
    lines = [json.loads(line) for line in (tmp_path / "spectral_metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6]
    assert "spec/model.layers.0.mlp.down_proj/cos_u_mean" in lines[2]  # against the restored step-4 subspace


def test_trainer_resume_continues_the_monitor_series(tmp_path):
    def train(output_dir: Path, resume: bool) -> list[dict]:
        trainer = tiny_trainer(tiny_llama().train(), output_dir, steps=4)
        trainer.args.save_strategy, trainer.args.save_steps = "steps", 2
        trainer.add_callback(poet_peft.SpectralMonitorCallback(trainer, poet_peft.SpectralMonitor("q_proj", every=2)))
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-2") if resume else None)
        return [json.loads(line) for line in (output_dir / "spectral_metrics.jsonl").read_text().splitlines()]

    uninterrupted = train(tmp_path / "a", resume=False)
    resumed = train(tmp_path / "a", resume=True)  # from checkpoint-2, over the same folder
    assert [line["step"] for line in uninterrupted] == [0, 2, 4] and [line["step"] for line in resumed] == [0, 2, 4]
    key = "spec/model.layers.1.self_attn.q_proj/"
    for metric in ("spectrum_drift", "cos_u_mean", "delta_sv_rel", "sv1"):
        assert resumed[2][key + metric] == pytest.approx(uninterrupted[2][key + metric], rel=1e-6)


def test_plots_survive_a_zero_energy_and_a_single_measurement(tmp_path):
    from poet_peft.plots import SpectralSeries, plot_runs

    record = {"step": 0, "spec/head/sigma_max": 1.0, "spec/head/sv1": 1.0, "spec/head/spectrum_drift": 0.0}
    series = SpectralSeries([{**record, "spec/head/hyperspherical_energy": 0.0}])
    assert [path.name for path in plot_runs({"one": series}, tmp_path)] == [
        "sigma_max.png", "spectra.png", "spectrum_drift.png",
    ]  # fmt: skip
