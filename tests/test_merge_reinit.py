"""Merge-then-reinitialize: the fold, optimizer reset, determinism, continuity, the spectrum bound, the schedule."""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import VOCAB, randomize_skew, run_fresh_python, tiny_llama
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import poet_peft
from poet_peft import MergeSchedule, POETCallback, POETConfig
from poet_peft.ops.spectral import singular_value_drift

SHAKESPEARE = Path(__file__).resolve().parents[1] / "examples" / "data" / "shakespeare.txt.gz"


def text_batches(batch_size: int, length: int, seed: int = 0):
    """Endless batches of real English as byte tokens (vocabulary 256) from the bundled text."""
    with gzip.open(SHAKESPEARE, "rb") as handle:
        data = torch.frombuffer(bytearray(handle.read(400_000)), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(len(data) - length, (batch_size,), generator=generator)
        yield torch.stack([data[s : s + length] for s in starts])


def byte_llama(seed: int = 0):
    """A tiny LLaMA over byte tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def train_steps(model, optimizer, batches, steps: int) -> None:
    """Plain optimizer steps on language-modelling loss."""
    for _ in range(steps):
        batch = next(batches)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_merge_folds_rotations_zeroes_q_and_redraws_permutations():
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16, merge_orthogonalize=False))
    randomize_skew(peft_model, std=0.05)
    layers = list(poet_peft.poet_layers(peft_model))
    expected = [layer.rotated_weight(["default"]).float() for layer in layers]
    perms = [layer.poet_perm_out["default"].clone() for layer in layers]
    assert poet_peft.merge_and_reinit(peft_model) == len(layers) == 14
    for layer, weight, perm in zip(layers, expected, perms):
        assert torch.allclose(layer.logical_weight(), weight, atol=1e-7)
        assert not layer.poet_R["default"].any() and not layer.poet_P["default"].any()
        assert int(layer.poet_merge_count["default"]) == 1
        assert not torch.equal(layer.poet_perm_out["default"], perm)


def test_a_diverged_adapter_is_refused_at_the_merge_and_w0_is_kept():
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16))
    randomize_skew(peft_model, std=0.05)
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    weights = {id(other): other.logical_weight().clone() for other in poet_peft.poet_layers(peft_model)}
    with torch.no_grad():
        layer.poet_P["default"][3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model.layers.1.mlp.down_proj: adapter 'default' has non-finite"):
        poet_peft.merge_and_reinit(peft_model)
    for other in poet_peft.poet_layers(peft_model):  # layers before and after the diverged one alike
        assert torch.equal(other.logical_weight(), weights[id(other)]) and int(other.poet_merge_count["default"]) == 0


@pytest.mark.parametrize(
    "orthogonalize, neumann_terms, tolerance",
    [(False, 3, 1e-6), (True, None, 1e-6), (True, 3, 1e-4)],
    ids=["as-trained", "exact-cayley", "default"],
)
def test_loss_is_continuous_across_a_merge(orthogonalize, neumann_terms, tolerance):
    # Folding R as trained, or exact-Cayley R (already orthogonal), leaves the function unchanged. The default
    # orthogonalised fold of a Neumann R moves it by O(‖Q‖⁴): small at the paper's POET lr.
    config = POETConfig(block=16, merge_orthogonalize=orthogonalize, neumann_terms=neumann_terms)
    model = get_peft_model(byte_llama(), config)
    optimizer = torch.optim.AdamW(poet_peft.create_param_groups(model, 1e-3, poet_lr=1e-3))
    batches = text_batches(8, 64)
    train_steps(model, optimizer, batches, 20)
    held_out = next(batches)
    with torch.no_grad():
        before = model(input_ids=held_out, labels=held_out).loss.item()
        poet_peft.merge_and_reinit(model, optimizer)
        after = model(input_ids=held_out, labels=held_out).loss.item()
    assert abs(after - before) / before < tolerance


OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups),
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, momentum=0.9),
    "adagrad": lambda groups: torch.optim.Adagrad(groups),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, momentum=0.5),
}


@pytest.mark.parametrize("accelerate", [False, True], ids=["plain", "accelerate"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_merge_resets_the_optimizer_state_of_exactly_the_q_parameters(name, accelerate):
    model = get_peft_model(byte_llama(), POETConfig(block=16, modules_to_save=["lm_head"]))
    optimizer = OPTIMIZERS[name](poet_peft.create_param_groups(model, 1e-3, poet_lr=1e-3))
    if accelerate:
        model, optimizer = Accelerator(cpu=True).prepare(model, optimizer)
    batches = text_batches(4, 32)
    train_steps(model, optimizer, batches, 3)
    q_params = poet_peft.poet_parameters(model)
    others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in q_params)]
    assert len(q_params) == 14 and others
    kept = {id(p): copy.deepcopy(optimizer.state[p]) for p in others}
    assert all(optimizer.state[q] for q in q_params)

    poet_peft.merge_and_reinit(model, optimizer)
    assert all(not optimizer.state.get(q) for q in q_params)
    for p in others:
        for key, value in kept[id(p)].items():
            assert torch.equal(torch.as_tensor(optimizer.state[p][key]), torch.as_tensor(value))

    # The next step starts Q's state afresh, exactly as for a newly created parameter.
    batch = next(batches)
    model(input_ids=batch, labels=batch).loss.backward()
    grads = [q.grad.clone() for q in q_params]
    optimizer.step()
    for q, grad in zip(q_params, grads):
        state = optimizer.state[q]
        if "step" in state:
            assert float(state["step"]) == 1
        if name == "adamw":
            assert torch.allclose(state["exp_avg"], 0.1 * grad)
        if name == "sgd-momentum":
            assert torch.allclose(state["momentum_buffer"], grad)
        if name == "adagrad":
            assert torch.allclose(state["sum"], grad.square())


DETERMINISM = """
import hashlib, torch, poet_peft
from peft import get_peft_model
from conftest import randomize_skew, tiny_llama
base = tiny_llama()
torch.manual_seed({global_seed})  # ranks' global RNG states differ; POET's draws must not depend on them
model = get_peft_model(base, poet_peft.POETConfig(block=16, mode="{mode}"))
for merge in range(3):
    randomize_skew(model, std=0.05, seed=merge)
    poet_peft.merge_and_reinit(model)
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode()); digest.update(tensor.numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.parametrize("mode, block", [("bs", 16), ("fs", 0.5)])
def test_merges_are_identical_in_separate_processes(mode, block, request):
    prefix = f"import sys; sys.path.insert(0, {str(request.path.parent)!r})\n"
    mode_code = DETERMINISM.replace('block=16, mode="{mode}"', f'block={block}, mode="{mode}"')
    digests = {run_fresh_python(prefix + mode_code.format(global_seed=seed)).strip() for seed in (1, 2)}
    assert len(digests) == 1


def test_orthogonalized_merges_keep_the_spectrum_through_500_merges_of_training():
    model = get_peft_model(byte_llama(), POETConfig(block=16, init_weights="normalized_gaussian"))
    twin = copy.deepcopy(model)
    for layer in poet_peft.poet_layers(twin):
        layer.poet_config["default"].merge_orthogonalize = False
    initial = [torch.linalg.svdvals(layer.logical_weight().double()) for layer in poet_peft.poet_layers(model)]
    skew_norms = []
    for candidate, merges in ((model, 500), (twin, 100)):
        optimizer = torch.optim.AdamW(poet_peft.create_param_groups(candidate, 1e-3, poet_lr=2e-2))
        batches = text_batches(4, 32)
        for _ in range(merges):
            train_steps(candidate, optimizer, batches, 2)
            skew_norms.append(max(p.detach().abs().max().item() for p in poet_peft.poet_parameters(candidate)))
            poet_peft.merge_and_reinit(candidate, optimizer)
    assert min(skew_norms) > 0.02  # the rotations folded were far from the identity
    final = [torch.linalg.svdvals(layer.logical_weight().double()) for layer in poet_peft.poet_layers(model)]
    drifted = [torch.linalg.svdvals(layer.logical_weight().double()) for layer in poet_peft.poet_layers(twin)]
    assert max(singular_value_drift(s0, s, floor=1) for s0, s in zip(initial, final)) < 1e-4
    assert max(singular_value_drift(s0, s, floor=0.01) for s0, s in zip(initial, final)) < 1e-4
    # Folding the Neumann R as trained moves the spectrum by orders of magnitude more, in a fifth of the merges.
    assert max(singular_value_drift(s0, s, floor=0.01) for s0, s in zip(initial, drifted)) > 1e-2


def bf16_merges(keep_spectrum: bool, merges: int = 200) -> tuple[float, float]:
    """Drift of a bf16 W0's spectrum (vs σ_max, vs each σᵢ ≥ 1% σ_max) after `merges` random merges.

    Without `keep_spectrum` each fold is rounded to bf16 as it is, which is what merging did before base_dtype.
    """
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(128, 96, bias=False)),
        POETConfig(block=32, target_modules=["0"], init_weights="normalized_gaussian", base_dtype="bfloat16"),
    )
    layer = next(poet_peft.poet_layers(model))
    initial = torch.linalg.svdvals(layer.logical_weight().double())
    for merge in range(merges):
        randomize_skew(model, std=0.02, seed=merge)
        if keep_spectrum:
            poet_peft.merge_and_reinit(model)
        else:
            layer.logical_weight().data.copy_(layer.rotated_weight(["default"], orthogonalize=True))
    final = torch.linalg.svdvals(layer.logical_weight().double())
    return singular_value_drift(initial, final, floor=1), singular_value_drift(initial, final, floor=0.01)


def test_a_bf16_base_keeps_its_spectrum_through_200_merges():
    kept, rounded = bf16_merges(keep_spectrum=True), bf16_merges(keep_spectrum=False)
    # One bf16 rounding's worth (2⁻⁹ relative per element), however many merges; rounding every fold adds up.
    assert kept[0] < 3e-4 and kept[1] < 2e-3
    assert rounded[0] > 4 * kept[0] and rounded[1] > 4 * kept[1]


def test_base_dtype_stores_w0_in_bf16_and_resumes_the_kept_spectrum(tmp_path):
    config = POETConfig(block=16, merge_every=1, init_weights="normalized_gaussian", base_dtype="bfloat16")
    model = get_peft_model(tiny_llama(), config)
    layer = next(poet_peft.poet_layers(model))
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert all(q.dtype == torch.float32 for q in poet_peft.poet_parameters(model))
    assert not layer.poet_base_spectrum.any()  # measured at the first merge, from the W0 before it
    before = torch.linalg.svdvals(layer.logical_weight().float())
    randomize_skew(model, std=0.05)
    poet_peft.merge_and_reinit(model)
    assert torch.equal(layer.poet_base_spectrum, before)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path, is_trainable=True)
    twin = next(poet_peft.poet_layers(reloaded))
    assert twin.get_base_layer().weight.dtype == torch.bfloat16
    assert torch.equal(twin.poet_base_spectrum, before) and torch.equal(twin.logical_weight(), layer.logical_weight())


def test_merge_is_skipped_while_adapters_are_disabled():
    peft_model = get_peft_model(tiny_llama(), POETConfig(block=16))
    randomize_skew(peft_model, std=0.05)
    before = copy.deepcopy(peft_model.state_dict())
    with peft_model.disable_adapter(), pytest.warns(UserWarning, match="adapters are disabled"):
        assert poet_peft.merge_and_reinit(peft_model) == 0
    assert all(torch.equal(before[key], value) for key, value in peft_model.state_dict().items())


def test_merge_schedule_merges_on_period_and_ramps_the_clip():
    model = get_peft_model(tiny_llama(), POETConfig(block=16, merge_every=10))
    schedule = MergeSchedule(model, clip_ramp_steps=5, clip_ramp_start=0.1)
    assert schedule.merge_every == 10
    assert [schedule.is_merge_step(step) for step in (0, 9, 10, 11, 20)] == [False, False, True, False, True]
    clips = [schedule.clip_norm(1.0, step) for step in (0, 9, 10, 11, 14, 15, 20)]
    assert clips == pytest.approx([1.0, 1.0, 0.1, 0.28, 0.82, 1.0, 0.1])
    assert not schedule.after_step(9)
    assert schedule.after_step(10)
    assert all(int(layer.poet_merge_count["default"]) == 1 for layer in poet_peft.poet_layers(model))
    never = MergeSchedule(get_peft_model(tiny_llama(), POETConfig(block=16, merge_every=None)))
    assert never.merge_every is None and not never.is_merge_step(400) and never.clip_norm(1.0, 400) == 1.0
    with pytest.raises(ValueError, match="clip_ramp_start"):
        MergeSchedule(model, clip_ramp_start=0)


def test_the_clip_ramp_stops_after_clip_ramp_until_as_the_official_gd_warmup_steps():
    model = get_peft_model(tiny_llama(), POETConfig(block=16, merge_every=200))
    capped = MergeSchedule(model, clip_ramp_until=2000)
    # Official (model_utils.py, gd_warmup_steps 2000): ramps after the merges at 200 … 1800, a single 0.1× step
    # after the one at 2000 (step 2000 itself is ≤ 2000), none after 2200.
    assert [capped.clip_norm(1.0, step) for step in (200, 205, 1800, 2000, 2001, 2200, 2205)] == pytest.approx(
        [0.1, 0.55, 0.1, 0.1, 1.0, 1.0, 1.0]
    )
    assert MergeSchedule(model).clip_norm(1.0, 2200) == pytest.approx(0.1)  # poet-peft's default: after every merge
    with pytest.raises(ValueError, match="clip_ramp_until"):
        MergeSchedule(model, clip_ramp_until=-1)


def official_adamw_reference(param, grads, lr, betas, eps, weight_decay):
    """The official POETAdamW's update in float64, written from its formula: eps on √v before bias correction,
    decay after the update."""
    p, m, v = param.double().clone(), torch.zeros_like(param, dtype=torch.float64), None
    v = torch.zeros_like(m)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t) * m / (v.sqrt() + eps)
        p = p - lr * weight_decay * p
    return p


def test_official_adamw_follows_the_official_formula_and_restarts_after_a_merge_reset():
    torch.manual_seed(0)
    start = torch.randn(6, 5)
    grads = [torch.randn(6, 5) * 10.0**-k for k in range(6)]  # gradients shrinking towards eps
    param = torch.nn.Parameter(start.clone())
    optimizer = poet_peft.OfficialAdamW([param], lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    expected = official_adamw_reference(start, grads, 1e-2, (0.9, 0.95), 1e-6, 0.1)
    assert (param.double() - expected).abs().max() <= 1e-6 * expected.abs().max()
    # torch's AdamW puts eps after the bias correction: with gradients far below eps (as Q's are right after a
    # merge) its first steps are several times larger than the official ones.
    tiny = [torch.randn(6, 5) * 1e-7 for _ in range(3)]
    torch_param, ours = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    torch_adamw = torch.optim.AdamW([torch_param], lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
    official = poet_peft.OfficialAdamW([ours], lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    for g in tiny:
        torch_param.grad, ours.grad = g.clone(), g.clone()
        torch_adamw.step()
        official.step()
    assert (torch_param - start).abs().mean() > 3 * (ours - start).abs().mean()
    tiny_reference = official_adamw_reference(start, tiny, 1e-2, (0.9, 0.95), 1e-6, 0.0)
    assert (ours.double() - tiny_reference).abs().max() <= 1e-6 * start.abs().max()
    # A merge forgets Q's moments and step (reset_optimizer_state): the next update is a first step again.
    poet_peft.reset_optimizer_state(official, [ours])
    before = ours.detach().clone()
    ours.grad = grads[0].clone()
    official.step()
    first = official_adamw_reference(before, grads[:1], 1e-2, (0.9, 0.95), 1e-6, 0.0)
    assert (ours.double() - first).abs().max() <= 1e-6 * first.abs().max()
    with pytest.raises(ValueError, match="betas in"):
        poet_peft.OfficialAdamW([ours], betas=(0.9, 1.0))


class RandomTokens(torch.utils.data.Dataset):
    """Random token sequences: enough to drive Trainer's loop."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


class ClipRecorder(TrainerCallback):
    """Records the clip norm Trainer uses at each optimizer step."""

    def __init__(self):
        self.clips = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.clips.append(args.max_grad_norm)


def test_poet_callback_merges_every_period_inside_trainer(tmp_path):
    model = get_peft_model(tiny_llama(), POETConfig(block=16, merge_every=3))
    recorder = ClipRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=7,
        per_device_train_batch_size=4,
        max_grad_norm=2.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=RandomTokens(), callbacks=[POETCallback(clip_ramp_steps=2), recorder]
    )
    trainer.train()
    assert all(int(layer.poet_merge_count["default"]) == 2 for layer in poet_peft.poet_layers(model))
    assert recorder.clips == pytest.approx([2.0, 2.0, 2.0, 0.2, 1.1, 2.0, 0.2])
    assert trainer.args.max_grad_norm == 2.0
    # The merge after step 6 reset Adam's state of Q: one step has been taken since.
    assert all(float(trainer.optimizer.state[q]["step"]) == 1 for q in poet_peft.poet_parameters(model))
