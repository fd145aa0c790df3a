"""examples/run_clm.py: real runs of the script (fresh processes, real Accelerate), on the bundled text, offline."""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from conftest import accelerate_launch, run_fresh_python
from safetensors.torch import load_file
from transformers import AutoTokenizer

import poet_peft

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_clm.py"
CPU_DDP_CONFIG = ROOT / "examples" / "configs" / "cpu_ddp.yaml"
FSDP2_CONFIG = ROOT / "examples" / "configs" / "fsdp2.yaml"
sys.path.insert(0, str(ROOT / "examples"))
import run_clm  # noqa: E402
import run_utils  # noqa: E402

VOCAB = 512
# 64 validation sequences (8,192 tokens at block 128) instead of the whole split's ~1,900: every evaluation
# still compares the same held-out text, and a run's evaluations stop dominating its time.
NANO = ["--model_size", "nano", "--vocab_size", str(VOCAB), "--block_size", "128", "--max_eval_samples", "64"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """Offline environment with private datasets and tokenizer caches, shared by this module's runs."""
    root = tmp_path_factory.mktemp("caches")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf"))
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return {"env": env, "tokenizers": str(root / "tokenizers")}


def command(cache: dict, output_dir: Path, *flags: str) -> list[str]:
    """The flags every run shares: its output folder and the module's tokenizer cache."""
    return ["--output_dir", str(output_dir), "--tokenizer_cache_dir", cache["tokenizers"], *flags]


def run_script(
    cache: dict, output_dir: Path, *flags: str, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Run run_clm.py (or `launcher` + its flags) in a fresh process; fail with its stderr if it fails."""
    argv = launcher or [sys.executable, str(SCRIPT)]
    result = subprocess.run(
        [*argv, *command(cache, output_dir, *flags)], capture_output=True, text=True, env=cache["env"], cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return result


def metrics(output_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) for every record holding `key`."""
    return [(record["step"], record[key]) for record in records if key in record]


@pytest.fixture(scope="module")
def poet_run(cache, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 60-step POET run of the nano model on the bundled text, with 3 merges, TensorBoard and a checkpoint."""
    output_dir = tmp_path_factory.mktemp("poet")
    flags = [*NANO, "--max_train_steps", "60", "--merge_every", "20", "--logging_steps", "5", "--eval_steps", "30"]
    result = run_script(cache, output_dir, *flags, "--checkpointing_steps", "60", "--report_to", "tensorboard")
    return output_dir, result


def assert_learns(records: list[dict]) -> None:
    """The training loss falls well below its start, and validation improves from one evaluation to the next."""
    train = [value for _, value in series(records, "train/loss")]
    evaluations = [value for _, value in series(records, "eval/loss")]
    assert abs(train[0] - math.log(VOCAB)) < 0.6  # starts near a model that knows nothing
    assert train[-1] < train[0] - 0.5
    assert len(evaluations) == 2 and evaluations[1] < evaluations[0] < math.log(VOCAB) - 0.5
    perplexities = [value for _, value in series(records, "eval/perplexity")]
    assert perplexities == pytest.approx([math.exp(value) for value in evaluations])


def test_poet_pretraining_learns_the_bundled_text_and_reports_it(poet_run):
    output_dir, result = poet_run
    records = metrics(output_dir)
    assert_learns(records)
    # nano: hidden 64, FFN 176, 2 layers, block 32 (hidden/2) → Q = 2 layers × 18,712; plus embeddings, lm_head, norms.
    assert "trainable parameters: 103,280 (POET Q: 37,424) of 203,632" in result.stdout
    tokens = series(records, "train/tokens")
    assert tokens[-1] == (60, 60 * 8 * 128)
    assert all(value > 0 for _, value in series(records, "train/tokens_per_second"))
    lr = series(records, "train/lr")
    # The first group's lr, the base lr (nano: 1e-2), decayed by the cosine to 1% of it.
    assert lr[-1][1] == pytest.approx(1e-2 * 0.01, rel=1e-6)
    final = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert final["eval/perplexity"] == pytest.approx(series(records, "eval/perplexity")[-1][1])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((output_dir / "runs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = events.Scalars("train/loss")
    steps, losses = zip(*series(records, "train/loss"))
    assert [event.step for event in logged] == list(steps)
    assert [event.value for event in logged] == pytest.approx(losses)


def test_adamw_pretraining_learns_and_reuses_the_cached_tokenizer(cache, poet_run, tmp_path):
    result = run_script(
        cache,
        tmp_path,
        *NANO,
        "--method",
        "adamw",
        "--max_train_steps",
        "60",
        "--logging_steps",
        "5",
        "--eval_steps",
        "30",
    )
    assert_learns(metrics(tmp_path))
    assert "POET" not in result.stdout and "trainable parameters: 166,208 of 166,208" in result.stdout
    assert "Training a byte-level BPE" in poet_run[1].stderr and "Training a byte-level BPE" not in result.stderr
    assert not list((tmp_path / "model").glob("adapter*"))


def test_merged_model_loads_in_plain_transformers_with_the_peft_models_logits(poet_run):
    output_dir, _ = poet_run
    checkpoint = output_dir / "checkpoints" / "step_60"
    assert json.loads((checkpoint / "training_state.json").read_text())["completed_steps"] == 60

    # The POET model as it stood at the end, rebuilt from the final checkpoint.
    args = run_clm.parse_args([*NANO, "--merge_every", "20"])
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "model")
    model = run_clm.METHODS["poet"].wrap(run_clm.build_model(args, tokenizer), args)
    model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=True)
    merges = {int(layer.poet_merge_count["default"]) for layer in run_clm.poet_peft.poet_layers(model)}
    assert merges == {3}
    tokens = tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.eval()(input_ids=tokens).logits

    plain = run_fresh_python(
        f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(output_dir / "model")!r}).eval()
        assert not any(name.startswith(("poet_peft", "peft")) for name in sys.modules)
        with torch.no_grad():
            print(json.dumps(model(input_ids=torch.tensor({tokens.tolist()})).logits.tolist()))
        """
    )
    torch.testing.assert_close(torch.tensor(json.loads(plain)), expected, atol=1e-5, rtol=1e-5)
    assert (output_dir / "model" / "model.safetensors").is_file()


def test_exported_pretraining_run_has_a_card_naming_poet_the_data_and_its_perplexity(poet_run, tmp_path):
    from huggingface_hub import ModelCard

    output_dir, _ = poet_run
    out = poet_peft.export_merged(output_dir / "model", tmp_path / "merged")
    card = ModelCard.load(out / "README.md")  # huggingface_hub's own parser
    assert card.data.pipeline_tag == "text-generation" and "poet" in card.data.tags
    assert card.data.hyperparameters["peft_type"] == "POET" and card.data.hyperparameters["block"] == 32
    (result,) = [r for r in card.data.eval_results if r.metric_type == "perplexity"]
    assert result.dataset_name == "wikipedia_summaries_en.jsonl.gz" and result.metric_value == pytest.approx(
        metrics(output_dir)[-1]["eval/perplexity"]
    )
    assert "pretrained from scratch with POET on wikipedia_summaries_en" in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text and "full finetuning" not in card.text


def test_ora_pretraining_learns_with_q_and_k_left_as_drawn(cache, tmp_path):
    flags = [*NANO, "--method", "ora", "--max_train_steps", "60", "--logging_steps", "5", "--eval_steps", "30"]
    result = run_script(cache, tmp_path, *flags)
    assert_learns(metrics(tmp_path))
    # nano: 2 layers × (q_proj + k_proj) of 64×64 frozen; everything else of the 166,208 trains.
    assert "trainable parameters: 149,824 of 166,208 (90.14%); frozen: 16,384" in result.stdout

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    args = run_clm.parse_args(flags)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    drawn = run_clm.METHODS["ora"].wrap(run_clm.build_model(args, tokenizer), args)
    for merged_layer, drawn_layer in zip(merged.model.layers, drawn.base_model.model.model.layers):
        for name in ("q_proj", "k_proj"):
            weight = getattr(merged_layer.self_attn, name).weight
            assert torch.equal(weight, getattr(drawn_layer.self_attn, name).base_layer.weight)  # never trained
            assert torch.allclose(weight @ weight.T, torch.eye(64), atol=1e-5)


def test_lora_pretraining_learns_rank_r_updates_beside_the_frozen_init(cache, tmp_path):
    flags = [*NANO, "--method", "lora", "--lora_r", "4", "--max_train_steps", "60", "--learning_rate", "3e-2"]
    result = run_script(cache, tmp_path, *flags, "--logging_steps", "5", "--eval_steps", "30")
    assert_learns(metrics(tmp_path))
    # Frozen: the block linears, 2 layers × (4·64² + 3·64·176). Trained: 4·4·(64+64) + 3·4·(64+176) = 4,928 LoRA
    # parameters per layer, plus embeddings and lm_head (512·64 each) and the 5 norms of 64.
    assert "trainable parameters: 75,712 of 176,064 (43.00%); frozen: 100,352" in result.stdout

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    args = run_clm.parse_args(flags)
    torch.manual_seed(args.seed)  # what run_clm.py does before building the model
    initial = run_clm.build_model(args, AutoTokenizer.from_pretrained(tmp_path / "model"))
    for name, weight in merged.named_parameters():
        if name.endswith("proj.weight"):
            update = (weight - initial.get_parameter(name)).double()
            singular = torch.linalg.svdvals(update)
            assert singular[0] > 1e-3 and singular[4] < 1e-6 * singular[0]  # a rank-4 update of the init


def test_galore_keeps_adam_moments_in_the_rank_hidden_over_4_projection():
    args = run_clm.parse_args([*NANO, "--method", "galore"])
    model = run_clm.build_model(args, run_clm.train_bpe_tokenizer(["a few words of text"], 300))
    groups = run_clm.galore_param_groups(model, args)
    galore = next(group for group in groups if group["name"] == "galore")
    assert galore["rank"] == 16 and len(galore["params"]) == 2 * 7  # hidden 64 / 4; every block linear
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    optimizer = run_clm.galore_optimizer(groups)
    batch = torch.randint(model.config.vocab_size, (2, 16))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    up, q = model.model.layers[0].mlp.up_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    assert optimizer.state[up]["exp_avg"].shape == (176, 16)  # (176, 64): its 64 side projected to rank 16
    assert optimizer.state[q]["exp_avg"].shape == (64, 16)
    assert optimizer.state[model.lm_head.weight]["exp_avg"].shape == model.lm_head.weight.shape  # plain AdamW


@pytest.mark.parametrize(
    "method, flags",
    [("galore", ["--galore_update_proj_gap", "20"]), ("muon", ["--learning_rate", "1e-2"])],
    ids=["galore", "muon"],
)
def test_baseline_optimizers_learn_and_resume_exactly(cache, tmp_path, method, flags):
    flags = [*NANO, "--method", method, *flags, "--max_train_steps", "60"]
    flags += ["--logging_steps", "5", "--eval_steps", "30", "--checkpointing_steps", "30"]
    run_script(cache, tmp_path / "full", *flags)
    assert_learns(metrics(tmp_path / "full"))
    # GaLore's projections (GaLoreProjector objects in its state) and Muon's momenta come back from the checkpoint.
    checkpoint = tmp_path / "full" / "checkpoints" / "step_30"
    run_script(cache, tmp_path / "resumed", *flags, "--resume_from_checkpoint", str(checkpoint))
    expected = [point for point in series(metrics(tmp_path / "full"), "train/loss") if point[0] > 30]
    assert series(metrics(tmp_path / "resumed"), "train/loss") == expected


def test_muon_orthogonalizes_the_block_weights_and_adamw_updates_the_rest():
    args = run_clm.parse_args([*NANO, "--method", "muon", "--learning_rate", "1e-2"])
    model = run_clm.build_model(args, run_clm.train_bpe_tokenizer(["a few words of text"], 300))
    reference = copy.deepcopy(model)
    groups = run_clm.muon_param_groups(model, args)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    muon = next(group for group in groups if group["name"] == "muon")
    assert len(muon["params"]) == 2 * 7 and all(p.ndim == 2 for p in muon["params"])  # every block linear
    optimizer = run_clm.MuonWithAdamW(groups)
    # The same step by torch.optim.Muon on the block weights and torch.optim.AdamW on the rest, separately.
    names = {id(p): name for name, p in model.named_parameters()}
    by_name = dict(reference.named_parameters())
    reference_groups = [
        {
            **{k: v for k, v in group.items() if k != "params"},
            "params": [by_name[names[id(p)]] for p in group["params"]],
        }
        for group in groups
    ]
    separate = [
        torch.optim.Muon([g for g in reference_groups if g.get("muon")], adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW([g for g in reference_groups if not g.get("muon")], betas=(0.9, 0.999), eps=1e-6),
    ]
    batch = torch.randint(model.config.vocab_size, (2, 16))
    for _ in range(2):
        for net, steppers in ((model, [optimizer]), (reference, separate)):
            net.zero_grad()
            net(input_ids=batch, labels=batch).loss.backward()
            for stepper in steppers:
                stepper.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, by_name[name]), name
    q = model.model.layers[0].self_attn.q_proj.weight
    assert set(optimizer.state[q]) == {"momentum_buffer"}  # Muon's, not Adam's moments
    assert set(optimizer.state[model.lm_head.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    # A checkpoint's optimizer state loads into a fresh optimizer and the next steps agree exactly.
    restored_model = copy.deepcopy(model)
    restored = run_clm.MuonWithAdamW(run_clm.muon_param_groups(restored_model, args))
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from a file: no tensor shared
    for net, stepper in ((model, optimizer), (restored_model, restored)):
        net.zero_grad()
        net(input_ids=batch, labels=batch).loss.backward()
        stepper.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored_model.parameters()))


def test_block_lr_gives_the_block_weights_their_own_lr():
    tokenizer = run_clm.train_bpe_tokenizer(["a few words of text"], 300)
    for method in ("adamw", "muon", "galore"):
        args = run_clm.parse_args([*NANO, "--method", method, "--learning_rate", "1e-2", "--block_lr", "3e-3"])
        model = run_clm.build_model(args, tokenizer)
        groups = run_clm.METHODS[method].param_groups(model, args)
        block = {id(linear.weight) for _, linear in run_clm.poet_peft.matching_linears(model, ["q_proj", "down_proj"])}
        lrs = {group["lr"] for group in groups for p in group["params"] if id(p) in block}
        rest = {group["lr"] for group in groups for p in group["params"] if p is model.lm_head.weight}
        assert (lrs, rest) == ({3e-3}, {1e-2}), method
        assert sorted(id(p) for group in groups for p in group["params"]) == sorted(map(id, model.parameters()))
    with pytest.raises(SystemExit):
        run_clm.parse_args([*NANO, "--method", "lora", "--block_lr", "3e-3"])


def test_poet_ablation_flags_reach_the_config():
    tokenizer = run_clm.train_bpe_tokenizer(["a few words of text"], 300)
    for flags, init, terms in (([], "normalized_gaussian", 3), (["--init_weights", "standard"], None, 3),
                               (["--init_weights", "xavier", "--neumann_terms", "exact"], "xavier", None),
                               (["--neumann_terms", "0"], "normalized_gaussian", 0)):  # fmt: skip
        args = run_clm.parse_args([*NANO, *flags])
        config = run_clm.wrap_poet(run_clm.build_model(args, tokenizer), args).peft_config["default"]
        assert (config.init_weights, config.neumann_terms) == (init, terms)
    with pytest.raises(SystemExit):
        run_clm.parse_args([*NANO, "--neumann_terms", "three"])


def test_synthesizer_baseline_learns_without_q_and_k(cache, tmp_path):
    flags = ["--method", "adamw", "--attention", "synthesizer_random", "--max_train_steps", "60"]
    result = run_script(cache, tmp_path, *NANO, *flags, "--logging_steps", "5", "--eval_steps", "30")
    assert_learns(metrics(tmp_path))
    # 166,208 − 2 layers × 2 × 64² for Q/K + 2 layers × 2 heads × 128² for the position logits.
    assert "trainable parameters: 215,360 of 215,360" in result.stdout
    assert "No model exported" in result.stdout and not (tmp_path / "model").exists()


def test_shape_overrides_cover_the_attention_ablations():
    tokenizer = run_clm.train_bpe_tokenizer(["a few words of text"], 300)
    heads = run_clm.build_model(run_clm.parse_args([*NANO, "--config_overrides", "num_attention_heads=4"]), tokenizer)
    assert (heads.config.num_attention_heads, heads.config.head_dim, heads.config.num_key_value_heads) == (4, 16, 4)
    overrides = "num_attention_heads=4,head_dim=8,num_hidden_layers=3"
    args = run_clm.parse_args([*NANO, "--method", "ora", "--config_overrides", overrides])
    model = run_clm.METHODS["ora"].wrap(run_clm.build_model(args, tokenizer), args)
    layers = list(run_clm.poet_peft.ora_layers(model))
    assert len(layers) == 6 and {layer.logical_weight().shape for layer in layers} == {torch.Size([32, 64])}
    assert max(layer.orthogonality_error() for layer in layers) < 1e-5  # d_k·h = 32 < 64: rows orthonormal


def small_corpus(path: Path, documents: int, skip: int = 0) -> Path:
    """The first documents of the bundled Wikipedia summaries as a .jsonl file."""
    with gzip.open(run_clm.BUNDLED_DATA, "rt", encoding="utf-8") as handle:
        lines = handle.readlines()[skip : skip + documents]
    path.write_text("".join(lines))
    return path


def test_spectral_lora_pretraining_learns_with_its_branches_clamped(cache, tmp_path):
    flags = [*NANO, "--method", "spectral_lora", "--max_train_steps", "60", "--learning_rate", "3e-2"]
    flags += ["--lora_alpha", "16"]  # α/r = 2
    result = run_script(
        cache, tmp_path, *flags, "--logging_steps", "5", "--eval_steps", "30", "--checkpointing_steps", "60"
    )
    records = metrics(tmp_path)
    assert_learns(records)
    # The frozen backbone, 2 layers × (4·64² for q, k, v, o + 3·64·176 for gate, up, down), is all that is frozen.
    assert "frozen: 100,352" in result.stdout
    ratios = [value for _, value in series(records, "train/clamp_ratio_max")]
    assert max(ratios) > 1  # the clamp had work to do at this lr
    assert all(value > 0 for _, value in series(records, "train/clamp_ms"))
    # The checkpoint's branches sit within c/√d_in.
    state = load_file(tmp_path / "checkpoints" / "step_60" / "model.safetensors")
    for key in [key for key in state if key.endswith("spectral_lora_A.default")]:
        stem = key.removesuffix("spectral_lora_A.default")
        delta = (
            2.0
            * state[stem + "spectral_lora_magnitude.default"].double().unsqueeze(1)
            * (state[stem + "spectral_lora_B.default"].double() @ state[key].double())
        )
        assert torch.linalg.svdvals(delta)[0].item() <= 0.7 / state[key].shape[1] ** 0.5 * (1 + 1e-6)
    from transformers import AutoModelForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), torch.nn.Module)


class Payload:
    """A pickle that, when unpickled, creates the file `marker`: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_e4_switch_resumes_exactly_and_exports_a_plain_model(cache, tmp_path):
    corpus = small_corpus(tmp_path / "corpus.jsonl", 60)
    flags = [
        *NANO, "--block_size", "64", "--train_file", str(corpus), "--method", "adamw", "--max_train_steps", "12",
        "--e4", "svd", "--e4_warmup_steps", "5", "--e4_rank", "4", "--checkpointing_steps", "8",
        "--logging_steps", "1", "--eval_steps", "6", "--target_perplexity", "100000",
        "--track_directions_every", "3", "--track_amplify", "2", "--spec-monitor", "--spec-every", "4",
        "--spec-topk", "2",
    ]  # fmt: skip
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    result = run_script(cache, uninterrupted, *flags)
    records = metrics(uninterrupted)
    assert series(records, "e4/switched_layers") == [(5, 14)]
    assert series(records, "time_to_target/steps") == [(6, 6)]  # reached at the first evaluation
    assert '"time_to_target/steps": 6' in result.stdout
    # Resume from the step-8 checkpoint, taken after the switch: the model and optimizer are rebuilt split first,
    # and the 3B subspaces measured at step 6 come back with the checkpoint.
    checkpoint = uninterrupted / "checkpoints" / "step_8"
    # The helpers' state is data (safetensors + JSON): Accelerate's custom-object pickles, which it unpickles with
    # weights_only=False, are neither written nor read, so one planted by an attacker never runs.
    assert {"stable_directions.json", "spectral_monitor.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    marker = tmp_path / "payload-ran"
    planted = [checkpoint / f"custom_checkpoint_{index}.pkl" for index in range(2)]
    for path in planted:
        path.write_bytes(pickle.dumps(Payload(marker)))
    argv = [
        sys.executable,
        str(SCRIPT),
        *command(cache, interrupted, *flags, "--resume_from_checkpoint", str(checkpoint)),
    ]
    tampered = subprocess.run(argv, capture_output=True, text=True, env=cache["env"], cwd=ROOT, check=False)
    assert tampered.returncode != 0 and "Number of custom checkpoints" in tampered.stderr  # Accelerate refuses
    assert not marker.exists()
    for path in planted:
        path.unlink()
    result = run_script(cache, interrupted, *flags, "--resume_from_checkpoint", str(checkpoint))
    resumed = metrics(interrupted)
    assert series(resumed, "train/loss") == [(step, loss) for step, loss in series(records, "train/loss") if step > 8]
    assert '"time_to_target/steps": 6' in result.stdout  # reached before the checkpoint, remembered by it
    # The monitor follows the split layers (their R + U·C·Vᵀ) and resumes its series: drift against the step-0
    # spectra, cosines against the step-8 subspaces.
    spectral = [record for record in records if "spec/seconds" in record]
    assert [record["step"] for record in spectral] == [0, 4, 8, 12]
    key = "spec/model.layers.0.self_attn.q_proj/"
    resumed_spectral = [record for record in resumed if "spec/seconds" in record]
    assert [record["step"] for record in resumed_spectral] == [12]
    for metric in ("sv1", "sv2", "spectrum_drift", "cos_u_mean", "cos_v1", "delta_sv_rel", "hyperspherical_energy"):
        assert resumed_spectral[0][key + metric] == pytest.approx(spectral[-1][key + metric], rel=1e-9, abs=1e-12)
    final = load_file(interrupted / "model" / "model.safetensors")
    reference = load_file(uninterrupted / "model" / "model.safetensors")
    assert final.keys() == reference.keys() and not any("core" in key or "principal" in key for key in final)
    assert all(torch.equal(final[name], reference[name]) for name in reference)


@pytest.mark.parametrize("mode", ["global", "random"])
def test_e4_controls_switch_at_the_end_of_warm_up(cache, tmp_path, mode):
    flags = [*NANO, "--block_size", "64", "--method", "adamw", "--max_train_steps", "6", "--e4", mode]
    run_script(cache, tmp_path, *flags, "--e4_warmup_steps", "3", "--logging_steps", "1", "--eval_steps", "6")
    records = metrics(tmp_path)
    # B1 moves the 14 target weights into a group at lr × 10; B2 adds their 14 cores.
    assert series(records, "e4/switched_layers") == [(3, 14)]
    lrs = dict(series(records, "train/lr"))
    assert dict(series(records, "e4/lr"))[3] == pytest.approx(10 * lrs[3])
    assert lrs[4] < lrs[3]  # the base lr keeps following its cosine schedule


def test_stable_directions_are_tracked_and_amplified(cache, tmp_path):
    flags = [*NANO, "--block_size", "64", "--method", "adamw", "--max_train_steps", "8", "--logging_steps", "1"]
    tracking = ["--track_directions_every", "4", "--track_topk", "4"]
    run_script(cache, tmp_path / "3b", *flags, *tracking, "--track_amplify", "3")
    run_script(cache, tmp_path / "plain", *flags, *tracking)
    amplified, plain = series(metrics(tmp_path / "3b"), "train/loss"), series(metrics(tmp_path / "plain"), "train/loss")
    # The first subspace is measured after step 4, so step 5's update is the first amplified: losses part at step 6.
    assert amplified[:5] == plain[:5] and all(a != b for (_, a), (_, b) in zip(amplified[5:], plain[5:]))
    records = [record for record in metrics(tmp_path / "3b") if "stable/p" in record]
    assert [record["step"] for record in records] == [4, 8]
    assert 0 < records[0]["stable/p"] <= 1 and "stable/cos_u_mean" in records[1]
    per_module = [key for key in records[1] if key.startswith("stable/model.layers.0.self_attn.q_proj/")]
    assert {key.rpartition("/")[2] for key in per_module} >= {"p", "p_prev", "cos_u_mean", "cos_v_mean"}


def test_killed_run_resumes_exactly_on_the_uninterrupted_loss_curve(cache, tmp_path):
    # 60 documents make ~19 optimizer steps per epoch, so the run crosses epochs; accumulation splits steps.
    corpus = small_corpus(tmp_path / "corpus.jsonl", 60)
    flags = [
        *NANO,
        "--block_size",
        "64",
        "--train_file",
        str(corpus),
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--max_train_steps",
        "30",
        "--merge_every",
        "7",
        "--checkpointing_steps",
        "4",
        "--logging_steps",
        "1",
        "--eval_steps",
        "10",
    ]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_script(cache, uninterrupted, *flags)

    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *command(cache, interrupted, *flags)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cache["env"],
        cwd=ROOT,
    )
    deadline = time.monotonic() + 300
    while not (interrupted / "checkpoints" / "step_8" / "training_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its step-8 checkpoint"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (interrupted / "model").exists()
    # A crash in the middle of saving leaves a .partial folder behind; resuming must not take it for a checkpoint.
    (interrupted / "checkpoints" / "step_28.partial").mkdir()
    resumed_from = run_utils.completed_checkpoints(interrupted)[-1]
    assert 8 <= int(resumed_from.name.split("_")[1]) < 30

    result = run_script(cache, interrupted, *flags, "--resume_from_checkpoint", "latest")
    assert f"Resuming from {resumed_from}" in result.stdout
    expected, resumed = metrics(uninterrupted), metrics(interrupted)
    assert len(series(expected, "train/loss")) == 30
    assert series(resumed, "train/loss") == series(expected, "train/loss")  # exactly, step by step
    assert series(resumed, "eval/loss") == series(expected, "eval/loss")
    final, reference = (
        load_file(interrupted / "model" / "model.safetensors"),
        load_file(uninterrupted / "model" / "model.safetensors"),
    )
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in reference)


def test_spectral_monitor_logs_seed_002_metrics_that_poet_peft_plot_draws(cache, tmp_path):
    flags = [*NANO, "--max_train_steps", "20", "--merge_every", "10", "--eval_steps", "20"]
    run_script(cache, tmp_path / "poet", *flags, "--spec-monitor", "--spec-every", "10", "--spec-topk", "3")
    records = [record for record in metrics(tmp_path / "poet") if "spec/seconds" in record]
    assert [record["step"] for record in records] == [0, 10, 20]
    module = "spec/model.layers.1.mlp.up_proj/"
    names = {key[len(module) :] for key in records[1] if key.startswith(module)}
    assert names == {
        "sigma_max", "sv1", "sv2", "sv3", "delta_sv_rel", "cos_u1", "cos_u2", "cos_u3", "cos_v1", "cos_v2", "cos_v3",
        "cos_u_max", "cos_u_mean", "cos_v_max", "cos_v_mean", "spectrum_drift", "hyperspherical_energy",
        "orth_err_R", "orth_err_P",
    }  # fmt: skip
    assert len([key for key in records[1] if key.endswith("/sigma_max")]) == 14  # run_clm's default targets
    run_script(
        cache, tmp_path / "adamw", *flags, "--method", "adamw", "--learning_rate", "3e-3", "--spec-monitor",
        "--spec-every", "10", "--spec-source", "momentum", "--spec-targets", "down_proj",
    )  # fmt: skip
    momentum = [record for record in metrics(tmp_path / "adamw") if "spec/seconds" in record]
    assert [record["step"] for record in momentum] == [10, 20]  # no momentum before the first step
    assert all("spectrum_drift" not in key for key in momentum[0])

    console_script = Path(sys.executable).with_name("poet-peft")
    command = [str(console_script), "plot", str(tmp_path / "poet" / "metrics.jsonl"), str(tmp_path / "adamw" /
               "metrics.jsonl"), "-o", str(tmp_path / "plots")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    names = ["sigma_max", "spectra", "principal_cosines", "spectrum_drift", "orthogonality"]
    assert result.stdout.split() == [str(tmp_path / "plots" / f"{name}.png") for name in names]
    for name in names:
        png = (tmp_path / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_two_process_accelerate_launch_keeps_ranks_identical_through_merges(cache, tmp_path):
    launcher = [*accelerate_launch(CPU_DDP_CONFIG), str(ROOT / "tests" / "run_clm_ranks.py")]
    result = run_script(
        cache,
        tmp_path,
        *NANO,
        "--max_train_steps",
        "10",
        "--merge_every",
        "3",
        "--logging_steps",
        "5",
        "--eval_steps",
        "10",
        launcher=launcher,
    )
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert [name for name in ranks[0] if not torch.equal(ranks[0][name], ranks[1][name])] == []
    counts = [tensor for name, tensor in ranks[0].items() if "poet_merge_count" in name]
    assert counts and all(int(count) == 3 for count in counts)
    q = [tensor for name, tensor in ranks[0].items() if ".poet_R." in name or ".poet_P." in name]
    assert q and all(tensor.abs().max() > 0 for tensor in q)  # trained for one step since the third merge
    assert series(metrics(tmp_path), "train/tokens")[-1] == (10, 10 * 2 * 8 * 128)  # both processes' batches
    # Each of the two processes takes half of this machine's cores, though accelerate launch exports one thread.
    assert f"{max(1, len(os.sched_getaffinity(0)) // 2)} CPU threads per process" in result.stdout


def test_fsdp2_launch_shards_poet_and_trains_merges_resumes_and_exports_as_one_process(cache, tmp_path):
    launch = accelerate_launch(FSDP2_CONFIG)
    flags = [*NANO, "--max_train_steps", "10", "--merge_every", "3", "--logging_steps", "1", "--eval_steps", "10"]
    sharded, single, resumed = tmp_path / "sharded", tmp_path / "single", tmp_path / "resumed"
    ranks_script = str(ROOT / "tests" / "run_clm_ranks.py")
    result = run_script(cache, sharded, *flags, "--checkpointing_steps", "5", launcher=[*launch, ranks_script])
    # Accelerate alone would run gloo DDP here: on CPU run_clm.py engages FSDP2 itself.
    assert "distributed: FSDP2 over 2 processes" in result.stdout
    for rank in (0, 1):
        held = json.loads((sharded / f"rank{rank}.json").read_text())
        assert held["parameter_bytes"] <= 0.55 * held["model_parameter_bytes"]  # every tensor split over 2 ranks
    ranks = [load_file(sharded / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert [name for name in ranks[0] if not torch.equal(ranks[0][name], ranks[1][name])] == []

    # One process with the same global batch (the two ranks' batches of 8 are its batch of 16) and 3 merges.
    run_script(cache, single, *flags, "--per_device_train_batch_size", "16", launcher=[sys.executable, ranks_script])
    losses, reference = series(metrics(sharded), "train/loss"), series(metrics(single), "train/loss")
    assert [step for step, _ in losses] == [step for step, _ in reference] == list(range(1, 11))
    assert all(abs(a - b) <= 1e-5 * b for (_, a), (_, b) in zip(losses, reference))
    whole = load_file(single / "rank0.safetensors")
    assert [name for name, t in whole.items() if not t.is_floating_point() and not torch.equal(ranks[0][name], t)] == []
    for name in [name for name in whole if name.endswith("base_layer.weight")]:  # W0, folded three times
        assert (ranks[0][name].double() - whole[name].double()).abs().max() <= 1e-4 * whole[name].abs().max(), name

    # Resumed from the sharded run's step-5 checkpoint: the same steps 6-10, and a plain merged export.
    checkpoint = sharded / "checkpoints" / "step_5"
    run_script(cache, resumed, *flags, "--resume_from_checkpoint", str(checkpoint), launcher=[*launch, str(SCRIPT)])
    assert series(metrics(resumed), "train/loss") == losses[5:]
    exported = load_file(resumed / "model" / "model.safetensors")
    args = run_clm.parse_args(command(cache, resumed, *flags))
    expected = run_clm.whole_copy(args, AutoTokenizer.from_pretrained(resumed / "model"), ranks[0])
    expected = expected.merge_and_unload().state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.allclose(exported[name], expected[name], atol=1e-6) for name in exported)

    # The checkpoint is sharded (torch.distributed.checkpoint, one file per rank) and its pickled metadata is
    # vetted before Accelerate unpickles it: a planted one is refused in one line and never runs.
    assert {path.name for path in (checkpoint / "pytorch_model_fsdp_0").iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}
    marker = tmp_path / "ran"
    (checkpoint / "optimizer_0" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    resume = command(cache, tmp_path / "refused", *flags, "--resume_from_checkpoint", str(checkpoint))
    refused = subprocess.run([*launch, str(SCRIPT), *resume], capture_output=True, text=True, env=cache["env"])
    assert refused.returncode != 0 and not marker.exists()
    assert "run_clm.py: error: " in refused.stderr and "is not torch.distributed.checkpoint metadata" in refused.stderr


@pytest.mark.parametrize("method", ["ora", "spectral_lora"])
def test_ora_and_spectral_lora_under_fsdp2_train_as_one_process(cache, tmp_path, method):
    launch = [*accelerate_launch(FSDP2_CONFIG), str(SCRIPT)]
    flags = [*NANO, "--method", method, "--max_train_steps", "3", "--logging_steps", "1", "--eval_steps", "3"]
    result = run_script(cache, tmp_path / "sharded", *flags, launcher=launch)
    assert "distributed: FSDP2 over 2 processes" in result.stdout
    run_script(cache, tmp_path / "single", *flags, "--per_device_train_batch_size", "16")
    losses = [series(metrics(tmp_path / run), "train/loss") for run in ("sharded", "single")]
    assert len(losses[0]) == len(losses[1]) == 3
    assert all(abs(a - b) <= 1e-5 * b for (_, a), (_, b) in zip(*losses))
    if method == "spectral_lora":  # the clamp acted, by the same σ on both ranks
        assert max(value for _, value in series(metrics(tmp_path / "sharded"), "train/clamp_ratio_max")) > 1


@pytest.mark.parametrize("method", ["galore", "muon"])
def test_whole_matrix_optimizers_under_fsdp2_are_refused_in_one_line(cache, tmp_path, method):
    launch = [*accelerate_launch(FSDP2_CONFIG), str(SCRIPT)]
    flags = command(cache, tmp_path, *NANO, "--method", method, "--max_train_steps", "1")
    result = subprocess.run([*launch, *flags], capture_output=True, text=True, env=cache["env"], cwd=ROOT)
    assert result.returncode != 0
    assert f"run_clm.py: error: --method {method} does not run under FSDP" in result.stderr


def test_run_clm_merges_as_often_as_poet_config_and_the_official_code_by_default():
    assert run_clm.parse_args([]).merge_every == poet_peft.POETConfig().merge_every == 200


def test_the_official_recipe_sets_the_official_flags_optimizer_and_trains(cache, tmp_path):
    names = ["learning_rate", "poet_lr", "block", "max_grad_norm", "weight_decay", "merge_every", "num_warmup_steps"]
    sixty = run_clm.parse_args(["--recipe", "official", "--model_size", "60m"])
    assert [getattr(sixty, name) for name in names] == [1e-2, 2e-3, 256, 0.1, 0.0, 200, 0]
    one_b = run_clm.parse_args(["--recipe", "official", "--model_size", "1b"])
    assert [getattr(one_b, name) for name in names] == [5e-3, 5e-4, 512, 1.0, 0.0, 200, 2000]
    assert run_clm.parse_args(["--recipe", "official", "--max_grad_norm", "0.5"]).max_grad_norm == 0.5  # flags win
    assert run_clm.parse_args([]).max_grad_norm == 1.0 and run_clm.parse_args([]).weight_decay == 0.01
    with pytest.raises(SystemExit):
        run_clm.parse_args(["--recipe", "official", "--method", "adamw"])
    flags = [*NANO, "--recipe", "official", "--max_train_steps", "4", "--merge_every", "2", "--logging_steps", "1"]
    result = run_script(cache, tmp_path, *flags, "--eval_steps", "4")
    assert "recipe official: --learning_rate 0.01, --poet_lr 0.002, --max_grad_norm 0.1" in result.stdout
    assert "OfficialAdamW; clip ramp until step 2000" in result.stdout
    losses = [loss for _, loss in series(metrics(tmp_path), "train/loss")]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


def test_the_readme_command_uses_every_core_under_accelerate_launch(cache, tmp_path):
    env = {key: value for key, value in cache["env"].items() if key != "OMP_NUM_THREADS"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", str(SCRIPT)]
    flags = command(cache, tmp_path, *NANO, "--block_size", "32", "--max_train_steps", "1", "--eval_steps", "100")
    result = subprocess.run([*launcher, *flags], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"{len(os.sched_getaffinity(0))} CPU threads per process" in result.stdout


def test_overwriting_a_run_deletes_nothing_until_the_inputs_are_valid(cache, poet_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    output_dir, _ = poet_run
    before = sorted(path.relative_to(output_dir) for path in output_dir.rglob("*"))
    argv = [sys.executable, str(SCRIPT), *command(cache, output_dir, *NANO, "--train_file", str(empty))]
    result = subprocess.run(
        [*argv, "--overwrite_output_dir"], capture_output=True, text=True, env=cache["env"], cwd=ROOT, check=False
    )
    assert result.returncode != 0
    assert sorted(path.relative_to(output_dir) for path in output_dir.rglob("*")) == before


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(cache, tmp_path):
    flags = [*NANO, "--block_size", "32", "--eval_steps", "100", "--checkpoints_total_limit", "2"]
    run_script(cache, tmp_path, *flags, "--max_train_steps", "6", "--checkpointing_steps", "2")
    assert [path.name for path in run_utils.completed_checkpoints(tmp_path)] == ["step_4", "step_6"]
    rewind = ["--resume_from_checkpoint", str(tmp_path / "checkpoints" / "step_4")]
    run_script(cache, tmp_path, *flags, "--max_train_steps", "5", "--checkpointing_steps", "1", *rewind)
    # step_4, the one resumed from, is kept; the abandoned future (step_6) is set aside, not pruned or resumed.
    assert [path.name for path in run_utils.completed_checkpoints(tmp_path)] == ["step_4", "step_5"]
    assert run_utils.resolve_checkpoint("latest", tmp_path).name == "step_5"
    (abandoned,) = (tmp_path / "checkpoints" / "abandoned").iterdir()
    assert [path.name for path in abandoned.iterdir()] == ["step_6"]
    # Other data or optimisation flags than the run was started with are refused, and each is listed.
    changed = [*flags, "--max_train_steps", "6", "--seed", "1", "--learning_rate", "0.002", *rewind]
    argv = [sys.executable, str(SCRIPT), *command(cache, tmp_path, *changed)]
    result = subprocess.run(argv, capture_output=True, text=True, env=cache["env"], cwd=ROOT, check=False)
    assert result.returncode != 0 and "the run it continues was started with other flags" in result.stderr
    assert "--learning_rate None → 0.002; --seed 0 → 1" in result.stderr


def test_rerunning_a_finished_run_says_what_to_do_in_one_line_and_the_advice_works(cache, tmp_path):
    flags = [*NANO, "--block_size", "32", "--max_train_steps", "2", "--eval_steps", "100"]
    run_script(cache, tmp_path, *flags)
    assert [path.name for path in run_utils.completed_checkpoints(tmp_path)] == ["step_2"]  # the last step, always
    argv = [sys.executable, str(SCRIPT), *command(cache, tmp_path, *flags)]
    again = subprocess.run(argv, capture_output=True, text=True, env=cache["env"], cwd=ROOT, check=False)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    (message,) = [line for line in again.stderr.splitlines() if line.startswith("run_clm.py: error:")]
    assert "holds a previous run. Pass --resume_from_checkpoint latest to continue it" in message
    run_script(cache, tmp_path, *flags, "--resume_from_checkpoint", "latest")  # the advice works
    run_script(cache, tmp_path, *flags, "--overwrite_output_dir")  # and so does the other one


def test_a_diverged_run_exits_non_zero_and_writes_no_model(cache, tmp_path):
    flags = [*NANO, "--max_train_steps", "4", "--learning_rate", "1e4", "--poet_lr", "1e4", "--max_grad_norm", "1e9"]
    argv = [sys.executable, str(SCRIPT), *command(cache, tmp_path, *flags, "--merge_every", "100")]
    result = subprocess.run(argv, capture_output=True, text=True, env=cache["env"], cwd=ROOT, check=False)
    assert result.returncode != 0 and "Refusing to checkpoint step_4: " in result.stderr and "NaN" in result.stderr
    assert not (tmp_path / "model").exists() and "Merged model" not in result.stdout
    assert not run_utils.completed_checkpoints(tmp_path)  # nothing that `latest` could resume from either


def test_text_files_and_a_streamed_dataset_folder(cache, tmp_path):
    with gzip.open(run_clm.BUNDLED_DATA, "rt", encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle.readlines()[:240]]
    (tmp_path / "train.txt").write_text("\n".join(texts[:200]))
    (tmp_path / "valid.txt").write_text("\n".join(texts[200:]))
    run_script(
        cache,
        tmp_path / "files",
        *NANO,
        "--method",
        "adamw",
        "--train_file",
        str(tmp_path / "train.txt"),
        "--validation_file",
        str(tmp_path / "valid.txt"),
        "--max_train_steps",
        "3",
    )
    assert len(series(metrics(tmp_path / "files"), "eval/loss")) == 1

    folder = tmp_path / "dataset"
    folder.mkdir()
    small_corpus(folder / "train.jsonl", 200)
    small_corpus(folder / "validation.jsonl", 20, skip=200)
    run_script(
        cache,
        tmp_path / "streamed",
        *NANO,
        "--dataset_name",
        str(folder),
        "--streaming",
        "--max_train_steps",
        "3",
        "--max_eval_samples",
        "4",
    )
    assert series(metrics(tmp_path / "streamed"), "train/tokens")[-1] == (3, 3 * 8 * 128)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--block", "0.5"], "--block 0.5 does not fit --mode bs"),
        (["--mode", "fs", "--block", "64"], "--block 64 does not fit --mode fs"),
        (["--block", "x"], "use an integer b ≥ 2 (POET-BS) or a fraction in (0, 1] (POET-FS)"),
        (["--streaming"], "--streaming applies to --dataset_name only"),
        (["--dataset_name", "allenai/c4", "--streaming"], "pass --max_train_steps"),
        (["--dataset_name", "x", "--train_file", "y.txt"], "either --dataset_name or --train_file"),
        (
            ["--method", "sgd"],
            "invalid choice: 'sgd' (choose from 'adamw', 'galore', 'lora', 'muon', 'ora', 'poet', 'spectral_lora')",
        ),
        (
            ["--e4", "svd"],
            "--e4 and --track_directions_every act on the plain model's Linear layers: use --method adamw",
        ),
        (["--method", "adamw", "--e4", "pca"], "invalid choice: 'pca' (choose from 'none', 'svd', 'random', 'global')"),
        (["--method", "adamw", "--track_amplify", "2"], "--track_amplify (variant 3B) needs --track_directions_every"),
        (["--lora_sigma_max", "-1"], "--lora_sigma_max '-1': use a number > 0 (seed 002: 0.7) or none"),
        (["--lora_backbone", "random"], "invalid choice: 'random' (choose from 'pretrained', 'frozen_random', 'zero')"),
        (["--method", "adamw", "--e4_lr_ratio", "0"], "--e4_lr_ratio 0.0: use a finite value > 0"),
        (["--learning_rate", "-1"], "--learning_rate -1.0: use a finite value > 0"),
        (["--poet_lr", "nan"], "--poet_lr nan: use a finite value > 0"),
        (["--max_grad_norm", "-1"], "--max_grad_norm -1.0: use a finite value > 0"),
        (["--min_lr_ratio", "5"], "--min_lr_ratio 5.0: the schedule ends at lr × this, use a value in [0, 1]"),
        (["--num_train_epochs", "0"], "--num_train_epochs 0: use an integer ≥ 1"),
        (["--block", "1/0"], "--block '1/0': use an integer b ≥ 2 (POET-BS) or a fraction in (0, 1] (POET-FS)"),
        (["--attention", "synthesizer_random"], "removes Q and K, which --method poet needs: use --method adamw"),
        (["--method", "adamw", "--synthesizer_fixed"], "--synthesizer_fixed applies to --attention synthesizer_"),
        (["--ora_init", "uniform"], "invalid choice: 'uniform' (choose from 'orthogonal', 'gaussian')"),
        (
            ["--model_size", "7b"],
            "invalid choice: '7b' (choose from 'nano', 'tiny', 'small', '60m', '130m', '350m', '1b')",
        ),
        (["--report_to", "comet"], "choose from 'none', 'tensorboard', 'wandb', 'trackio', 'all'"),
        (["--max_train_steps", "0"], "--max_train_steps 0: use an integer ≥ 1"),
        (["--spec-every", "0"], "--spec_every 0: use an integer ≥ 1"),
        (["--spec-source", "grad"], "--spec-source grad reads the targets' own weights, which --method poet freezes"),
        (["--spec-source", "svd"], "invalid choice: 'svd' (choose from 'weight', 'grad', 'momentum')"),
    ],
)
def test_bad_flags_are_rejected_with_the_valid_choices(flags, message, capsys):
    with pytest.raises(SystemExit):
        run_clm.parse_args(flags)
    assert message in capsys.readouterr().err


def test_spectral_lora_optimizer_groups_follow_the_flags():
    tokenizer = run_clm.train_bpe_tokenizer(["a few words of text"], 300)
    args = run_clm.parse_args(
        [*NANO, "--method", "spectral_lora", "--magnitude_lr_ratio", "7", "--learning_rate", "2e-3"]
    )
    model = run_clm.METHODS["spectral_lora"].wrap(run_clm.build_model(args, tokenizer), args)
    groups = {group["name"]: group for group in run_clm.METHODS["spectral_lora"].param_groups(model, args)}
    assert groups["magnitude"]["lr"] == pytest.approx(7 * 2e-3) and groups["magnitude"]["weight_decay"] == 0.0
    assert len(groups["magnitude"]["params"]) == 14 and groups["matrices"]["lr"] == 2e-3


def test_bad_data_and_output_folders_fail_before_losing_anything(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'; use \.txt, \.json, \.jsonl"):
        run_clm.load_raw_splits(run_clm.parse_args(["--train_file", "data.csv"]))
    corpus = small_corpus(tmp_path / "corpus.jsonl", 20)
    with pytest.raises(ValueError, match=r"--text_column 'body' is not in the data; its columns: \['title', 'text'\]"):
        run_clm.load_raw_splits(run_clm.parse_args(["--train_file", str(corpus), "--text_column", "body"]))

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"--train_file .*empty.txt is empty: give a file with text in it"):
        run_clm.load_raw_splits(run_clm.parse_args(["--train_file", str(tmp_path / "empty.txt")]))
    tokenizer = run_clm.train_bpe_tokenizer(["a few words of text"], 300)
    long_blocks = run_clm.parse_args(["--block_size", "4096"])
    with pytest.raises(ValueError, match="the validation split holds 6 tokens, not enough for one sequence of --block"):
        few = datasets.Dataset.from_dict({"text": ["a few words of text"]})
        run_clm.tokenize_and_pack(few, tokenizer, long_blocks, "the validation split")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(run_utils.UsageError, match="--resume_from_checkpoint latest to continue it"):
        run_utils.check_output_dir(run_clm.parse_args(["--output_dir", str(tmp_path)]), ("metrics.jsonl",))
    # A folder this script did not write (no marker) is never deleted, even when told to overwrite.
    overwrite = run_clm.parse_args(["--output_dir", str(tmp_path), "--overwrite_output_dir"])
    with pytest.raises(run_utils.UsageError, match="deletes only runs this script wrote, and .* holds metrics.jsonl"):
        run_utils.check_output_dir(overwrite, ("metrics.jsonl",))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    with pytest.raises(run_utils.UsageError, match="no complete checkpoint"):
        run_utils.resolve_checkpoint("latest", tmp_path)

    monkeypatch.setattr(run_utils.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="--report_to wandb needs the wandb package: pip install wandb"):
        run_utils.check_tracker("wandb")


def test_defaults_follow_the_paper():
    tokenizer = run_clm.train_bpe_tokenizer(["a few words of text"], 300)
    args = run_clm.parse_args(["--model_size", "60m"])
    model = run_clm.build_model(args, tokenizer)
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers) == (512, 1280, 8)
    assert run_clm.base_learning_rate(args) == 1e-2
    assert run_clm.base_learning_rate(run_clm.parse_args(["--model_size", "1b"])) == 1e-3
    model = run_clm.METHODS["poet"].wrap(model, args)
    assert args.block == 256  # min(256, hidden/2)
    assert sum(param.numel() for param in run_clm.poet_peft.poet_parameters(model)) == 9_661_440  # paper: 9.66M
    assert not any("lm_head" in name for name, _ in model.named_modules() if "poet" in type(_).__name__.lower())
    # POET lr: 1e-3 at b=256 and f=1/2, doubling as the block halves (paper: b=128 2e-3, b=64 4e-3).
    rates = {
        (mode, block): run_clm.poet_learning_rate(run_clm.parse_args(["--mode", mode]), block)
        for mode, block in (("bs", 256), ("bs", 128), ("bs", 64), ("fs", 0.5), ("fs", 0.125))
    }
    assert rates == pytest.approx(
        {("bs", 256): 1e-3, ("bs", 128): 2e-3, ("bs", 64): 4e-3, ("fs", 0.5): 1e-3, ("fs", 0.125): 4e-3}
    )
