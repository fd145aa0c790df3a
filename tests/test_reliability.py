"""What careless or hostile input must never do: write NaN weights, load a damaged adapter, lose the user's settings."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import outputs, randomize_skew, tiny_llama, tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments
from transformers.trainer_callback import TrainerCallback

import poet_peft
from poet_peft import ORAConfig, POETConfig, SpectralLoRAConfig

ADAPTER_FILE = "adapter_model.safetensors"


def poisoned(config) -> torch.nn.Module:
    """A tiny LLaMA with the adapter of `config`, one of whose trained tensors holds a NaN."""
    model = get_peft_model(tiny_llama(), config)
    param = next(p for n, p in model.named_parameters() if p.requires_grad and "v_proj" in n)
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    return model


CONFIGS = [POETConfig(block=16), SpectralLoRAConfig(r=4), ORAConfig()]


@pytest.mark.parametrize("config", CONFIGS, ids=["poet", "spectral_lora", "ora"])
def test_saving_an_adapter_with_nan_weights_is_refused_and_writes_nothing(config, tmp_path):
    model = poisoned(copy.deepcopy(config))
    with pytest.raises(FloatingPointError, match=r"Refusing to save the adapter: .*v_proj.* holds 1 NaN or inf"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / ADAPTER_FILE).exists()


@pytest.mark.parametrize("config", CONFIGS[:2], ids=["poet", "spectral_lora"])
def test_merge_and_unload_of_a_nan_adapter_is_refused_and_leaves_the_model_whole(config):
    model = poisoned(copy.deepcopy(config))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"Refusing to merge: .*v_proj"):
        model.merge_and_unload()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], value) or value.isnan().any() for key, value in before.items())


def test_a_16_bit_w0_that_would_overflow_at_a_merge_is_kept():
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False)), POETConfig(block=8, target_modules=["0"])
    )
    layer = next(poet_peft.poet_layers(model))
    layer.cast_base_weight(torch.float16)
    with torch.no_grad():
        layer.logical_weight().fill_(60000.0)  # a rotation that mixes rows puts up to 8 · 60000 into one entry
    randomize_skew(model, std=0.5)
    w0 = layer.logical_weight().clone()
    with pytest.raises(FloatingPointError, match="merged W0 of 0 .* holds .* NaN or inf"):
        poet_peft.merge_and_reinit(model)
    assert torch.equal(layer.logical_weight(), w0) and int(layer.poet_merge_count["default"]) == 0


def write_tokenizer(folder) -> None:
    """A minimal word-level tokenizer, enough for save_finetuned and export."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "a": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)


def test_export_of_an_adapter_with_a_nan_is_refused_and_writes_no_folder(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    write_tokenizer(base)
    model = get_peft_model(tiny_llama(), POETConfig(block=16, task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = str(base)
    poet_peft.save_finetuned(model, AutoTokenizer.from_pretrained(base), tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / ADAPTER_FILE)
    key = next(key for key in weights if key.endswith("q_proj.poet_R"))
    weights[key][3] = float("nan")  # what a diverged run's adapter would hold
    save_file(weights, tmp_path / "adapter" / ADAPTER_FILE)
    with pytest.raises(FloatingPointError, match="Refusing to merge: .*q_proj"):
        poet_peft.export_merged(tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def saved_poet_adapter(tmp_path, tokens):
    """A saved POET adapter with moved Q, its folder, and the logits it gives."""
    model = get_peft_model(tiny_llama(), POETConfig(block=16))
    randomize_skew(model, std=0.05)
    model.save_pretrained(tmp_path)
    return load_file(tmp_path / ADAPTER_FILE), outputs(model, tokens)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda perm: perm.copy_(torch.cat([perm[:1], perm[:-1]])), "is not a permutation of 0..63"),
        (lambda perm: perm.__setitem__(0, 64), "is not a permutation of 0..63"),
    ],
    ids=["repeated-index", "out-of-range"],
)
def test_a_tampered_permutation_is_refused_with_its_key_and_layer(damage, message, tmp_path, tokens):
    weights, _ = saved_poet_adapter(tmp_path, tokens)
    key = "base_model.model.model.layers.0.self_attn.q_proj.poet_perm_in"
    damage(weights[key])
    save_file(weights, tmp_path / ADAPTER_FILE)
    with pytest.raises(
        ValueError, match=rf"{key} in the adapter file \(layer model.layers.0.self_attn.q_proj\) {message}"
    ):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize(
    "config", [POETConfig(block=16), ORAConfig(), SpectralLoRAConfig(r=4)], ids=["poet", "ora", "spectral_lora"]
)
def test_an_adapter_file_missing_a_key_is_refused(config, tmp_path):
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / ADAPTER_FILE)
    dropped = next(key for key in sorted(weights) if "layers.1." in key and "mlp" in key)
    del weights[dropped]
    save_file(weights, tmp_path / ADAPTER_FILE)
    with pytest.raises(ValueError, match=r"lacks 1 of the tensors this model expects \(.*layers\.1\..*mlp"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_merging_one_of_two_poet_adapters_is_refused_and_merging_both_keeps_the_function(tokens):
    # Folded as trained (no orthogonalisation), so that merging keeps the function to rounding.
    model = get_peft_model(tiny_llama(), POETConfig(block=16, merge_orthogonalize=False), adapter_name="a")
    model.add_adapter("b", POETConfig(block=8, seed=1, merge_orthogonalize=False))
    model.base_model.set_adapter(["a", "b"])
    randomize_skew(model, std=0.05)
    model.base_model.set_adapter("a")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="would change what the inactive adapter\\(s\\) b compute"):
        poet_peft.merge_and_reinit(model)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    model.base_model.set_adapter(["a", "b"])
    expected = outputs(model, tokens)
    assert poet_peft.merge_and_reinit(model) == 14
    assert torch.allclose(outputs(model, tokens), expected, atol=1e-5)


class FailOnStep(TrainerCallback):
    """Raises at the start of a given step: an interrupt in the middle of training."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class ClipAtStart(TrainerCallback):
    """Records max_grad_norm as each train() begins (after the callbacks before it)."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen.append(args.max_grad_norm)


class RandomTokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        tokens = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": tokens, "labels": tokens}


def test_an_interrupt_during_the_clip_ramp_does_not_leak_the_ramped_clip_into_the_next_train(tmp_path):
    model = get_peft_model(tiny_llama(), POETConfig(block=16, merge_every=2))
    args = TrainingArguments(
        tmp_path, max_steps=6, per_device_train_batch_size=4, max_grad_norm=1.0, report_to=[], save_strategy="no"
    )
    poet, recorder = poet_peft.POETCallback(clip_ramp_steps=4, clip_ramp_start=0.1), ClipAtStart()
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[poet, FailOnStep(3)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()  # merged after step 2, so step 3 began with the clip ramped down
    assert args.max_grad_norm < 1.0
    trainer.remove_callback(FailOnStep)
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.seen == [1.0] and args.max_grad_norm == 1.0


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: POETConfig(merge_orthogonalize="no"), r"POETConfig.merge_orthogonalize='no' must be True or False"),
        (lambda: ORAConfig(trainable_qk="yes"), r"ORAConfig.trainable_qk='yes' must be True or False"),
        (lambda: SpectralLoRAConfig(lora_alpha="8"), r"SpectralLoRAConfig.lora_alpha='8' must be a number"),
        (lambda: POETConfig(target_modules=123), r"POETConfig.target_modules=123 is invalid: use None, a regex"),
        (lambda: ORAConfig(exclude_modules=[1, 2]), r"ORAConfig.exclude_modules=\[1, 2\] is invalid"),
    ],
    ids=["bool-string", "ora-bool-string", "number-string", "targets-int", "excludes-ints"],
)
def test_config_fields_of_the_wrong_type_are_refused_by_name(build, message):
    with pytest.raises(TypeError, match=message):
        build()


@pytest.mark.parametrize(
    "apply",
    [
        lambda model: get_peft_model(model, POETConfig(block=16, target_modules=["lm_head"])),
        lambda model: get_peft_model(model, SpectralLoRAConfig(r=4, target_modules=["lm_head"])),
        lambda model: poet_peft.extract_principal(model, 4, ["lm_head"]),
    ],
    ids=["poet", "spectral_lora", "e4"],
)
def test_a_tied_lm_head_is_refused_and_left_untouched(apply):
    model = tiny_model("gpt2")  # GPT-2 ties lm_head to the input embeddings
    embeddings = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match=r"cannot rewrite lm_head.weight: it is tied to transformer.wte.weight"):
        apply(model)
    assert torch.equal(model.get_input_embeddings().weight, embeddings) and type(model.lm_head) is torch.nn.Linear


def quickstart_adapter(tmp_path, tokens):
    """A Quickstart POET adapter (no task_type) on a local causal-LM base, and the logits it gives."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    write_tokenizer(base)
    model = get_peft_model(tiny_llama(), POETConfig(block=16))
    model.peft_config["default"].base_model_name_or_path = str(base)
    randomize_skew(model, std=0.05)
    poet_peft.save_finetuned(model, AutoTokenizer.from_pretrained(base), tmp_path / "adapter")
    return base, outputs(model, tokens)


def test_export_of_an_adapter_without_task_type_keeps_the_base_architecture_and_its_logits(tmp_path, tokens):
    _, expected = quickstart_adapter(tmp_path, tokens)
    out = poet_peft.export_merged(tmp_path / "adapter", tmp_path / "merged")
    exported = LlamaForCausalLM.from_pretrained(out)
    assert exported.config.architectures == ["LlamaForCausalLM"]
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    assert torch.allclose(outputs(exported, tokens), expected, atol=1e-5)


def test_export_into_the_base_or_adapter_folder_is_refused(tmp_path, tokens):
    base, _ = quickstart_adapter(tmp_path, tokens)
    for out, folder in ((base / "merged", "base model's folder"), (tmp_path / "adapter" / "merged", "adapter folder")):
        with pytest.raises(ValueError, match=f"would write into or over the {folder}"):
            poet_peft.export_merged(tmp_path / "adapter", out)
        assert not out.exists()


def test_poet_on_a_meta_device_model_is_refused_clearly():
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = tiny_llama()
    with pytest.raises(ValueError, match="weight is on the meta device \\(init_empty_weights\\)"):
        get_peft_model(model, POETConfig(block=16))
    assert not list(poet_peft.poet_layers(model))  # nothing half-wrapped


def test_lora_then_poet_says_to_merge_the_lora_first():
    from peft import LoraConfig

    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).base_model.model
    with pytest.raises(TypeError, match=r"already a peft\.tuners\.lora\.layer\.Linear layer of another PEFT method"):
        get_peft_model(lora, POETConfig(block=16, target_modules=["q_proj"]))


def test_e4_names_a_string_target_as_a_regex_and_the_monitor_binds_to_a_nan_weight():
    with pytest.raises(ValueError, match=r"A string is a regex .* pass names as a list \(e.g. \['q_proj'\]\)"):
        poet_peft.extract_principal(tiny_llama(), 4, "q_proj")
    with pytest.raises(TypeError, match="extract_principal: k=2.5 must be an integer rank ≥ 1"):
        poet_peft.extract_principal(tiny_llama(), 2.5, ["q_proj"])
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    monitor = poet_peft.SpectralMonitor("q_proj", 1, 2).bind(model)
    metrics = monitor.measure(0)
    assert metrics["spec/model.layers.0.self_attn.q_proj/nonfinite"] == 1.0
    assert "spec/model.layers.1.self_attn.q_proj/sigma_max" in metrics


def test_a_second_adapter_with_other_targets_loads_beside_the_first(tmp_path, tokens):
    model = get_peft_model(tiny_llama(), POETConfig(block=16, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", POETConfig(block=16, target_modules=["v_proj"], seed=1))
    model.base_model.set_adapter("b")
    randomize_skew(model, std=0.05)
    expected = outputs(model, tokens)
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    fresh = get_peft_model(tiny_llama(), POETConfig(block=16, target_modules=["q_proj"]), adapter_name="a")
    fresh.load_adapter(tmp_path / "b", adapter_name="b")
    fresh.base_model.set_adapter("b")
    assert torch.equal(outputs(fresh, tokens), expected)
