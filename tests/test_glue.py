"""GLUE finetuning (examples/run_glue.py), its packaged metric, and `poet-peft export`: real runs, offline."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import accelerate_launch, randomize_skew, run_fresh_python, tiny_llama
from huggingface_hub import ModelCard
from peft import get_peft_model
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
)

import poet_peft

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_glue.py"
CPU_DDP_CONFIG = ROOT / "examples" / "configs" / "cpu_ddp.yaml"
sys.path.insert(0, str(ROOT / "examples"))
import run_glue  # noqa: E402

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "dull", "poor", "weak"]
FILLER = ["the", "film", "was", "a", "story", "and", "plot", "very", "its", "cast", "music", "ending"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentence(rng: random.Random, positive: bool) -> str:
    """A few filler words around one sentiment word."""
    words = rng.choices(FILLER, k=rng.randint(3, 7))
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words)


def write_tokenizer(folder: Path, pad: bool = True) -> None:
    """A word-level WordPiece tokenizer over the test vocabulary, BERT-style ([CLS] a [SEP] b [SEP])."""
    vocab = {token: index for index, token in enumerate(SPECIAL + POSITIVE + NEGATIVE + FILLER)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    special = dict(unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]")
    if pad:
        special["pad_token"] = "[PAD]"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(folder)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """Tiny headless model folders from configs, as pretrained checkpoints are: BERT (hidden 32 and 48), LLaMA."""
    root = tmp_path_factory.mktemp("models")
    vocab = len(SPECIAL + POSITIVE + NEGATIVE + FILLER)
    torch.manual_seed(0)
    for name, hidden in (("bert", 32), ("bert48", 48)):
        shape = dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        BertModel(BertConfig(vocab_size=vocab, **shape)).save_pretrained(root / name)  # no head, as pretrained
        write_tokenizer(root / name)
    llama = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        eos_token_id=3,
    )
    LlamaModel(llama).save_pretrained(root / "llama")
    write_tokenizer(root / "llama", pad=False)  # a decoder without a padding token: run_glue pads with eos
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """GLUE-layout files: sst2 (CSV), mrpc (TSV, pairs), stsb (JSON, scores), cola (JSON lines)."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    for split, count in (("train", 96), ("validation", 40)):
        labels = [rng.random() < 0.5 for _ in range(count)]
        rows = [(sentence(rng, label), int(label)) for label in labels]
        with open(root / f"sst2_{split}.csv", "w", encoding="utf-8") as handle:
            handle.write("sentence,label\n" + "".join(f'"{text}",{label}\n' for text, label in rows))
        pairs = [(sentence(rng, rng.random() < 0.5), sentence(rng, rng.random() < 0.5)) for _ in range(count)]
        same = [int(any(w in POSITIVE for w in a.split()) == any(w in POSITIVE for w in b.split())) for a, b in pairs]
        with open(root / f"mrpc_{split}.tsv", "w", encoding="utf-8") as handle:
            handle.write("sentence1\tsentence2\tlabel\tidx\n")
            handle.write("".join(f"{a}\t{b}\t{label}\t{i}\n" for i, ((a, b), label) in enumerate(zip(pairs, same))))
        scores = [{"sentence1": a, "sentence2": b, "label": 5.0 * rng.random()} for a, b in pairs]
        (root / f"stsb_{split}.json").write_text(json.dumps(scores))
        (root / f"cola_{split}.jsonl").write_text(
            "".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in rows)
        )
    return root


def run_script(output_dir: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run run_glue.py in a fresh, offline process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(output_dir), *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if check:
        assert result.returncode == 0, result.stderr[-6000:]
    return result


def local_task(models_dir: Path, data_dir: Path, task: str, extension: str, model: str = "bert") -> list[str]:
    """The flags of a run on the tiny model and a task's local files."""
    return [
        "--model_name_or_path",
        str(models_dir / model),
        "--task_name",
        task,
        "--train_file",
        str(data_dir / f"{task}_train{extension}"),
        "--validation_file",
        str(data_dir / f"{task}_validation{extension}"),
        "--per_device_train_batch_size",
        "16",
        "--logging_steps",
        "2",
    ]


def records(output_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def validation_outputs(best: Path, task: str, validation: list[dict]) -> np.ndarray:
    """The saved best model's outputs (logits) on validation rows, computed here independently of the script."""
    model, _, _ = poet_peft.load_merged(best)
    tokenizer = AutoTokenizer.from_pretrained(best)
    columns = run_glue.TASKS[task].text_columns
    batch = tokenizer(*([row[column] for row in validation] for column in columns), padding=True, return_tensors="pt")
    return model.eval()(**batch).logits.numpy()


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV, TSV, JSON or JSON-lines file as run_glue reads them."""
    import datasets

    builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}[path.suffix]
    options = {"sep": "\t", "quoting": 3} if path.suffix == ".tsv" else {}
    return list(datasets.load_dataset(builder, data_files=str(path), split="train", **options))


# ----------------------------------------------------------------------------------------------------- the metric
def test_glue_metric_matches_sklearn_and_scipy():
    """Every GLUE configuration of the packaged evaluate module gives scikit-learn's and scipy's numbers."""
    rng = np.random.default_rng(0)
    references, predictions = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    classification = {
        "accuracy": accuracy_score(references, predictions),
        "f1": f1_score(references, predictions),
        "matthews_correlation": matthews_corrcoef(references, predictions),
    }
    reported = {"cola": {"matthews_correlation"}, "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"}}
    reported["rotten_tomatoes"] = set(classification)
    for task in ("cola", "sst2", "mrpc", "qqp", "qnli", "rte", "rotten_tomatoes"):
        computed = poet_peft.load_glue_metric(task).compute(predictions=predictions, references=references)
        assert set(computed) == reported.get(task, {"accuracy"}) and run_glue.TASKS[task].main_metric in computed
        for name, value in computed.items():
            assert value == pytest.approx(classification[name], abs=1e-12), (task, name)
    three_way_truth, three_way = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    mnli = poet_peft.load_glue_metric("mnli").compute(predictions=three_way, references=three_way_truth)
    assert mnli["accuracy"] == pytest.approx(accuracy_score(three_way_truth, three_way), abs=1e-12)
    # Scores with ties (rounded), as STS-B's are: Spearman's average ranks matter.
    truth = np.round(rng.uniform(0, 5, 150), 1)
    scores = np.round(truth + rng.normal(0, 1.0, 150), 0)
    stsb = poet_peft.load_glue_metric("stsb").compute(predictions=scores, references=truth)
    assert stsb["pearson"] == pytest.approx(pearsonr(scores, truth).statistic, abs=1e-6)  # float32 inputs
    assert stsb["spearmanr"] == pytest.approx(spearmanr(scores, truth).statistic, abs=1e-6)


def test_glue_metric_functions_match_references_on_edge_cases():
    """Multiclass MCC, no positives, constant predictions, perfect and inverse rankings, in float64."""
    module = metric_module()
    rng = np.random.default_rng(1)
    for classes in (2, 3, 5):
        truth, predicted = rng.integers(0, classes, 500), rng.integers(0, classes, 500)
        predicted[:250] = truth[:250]
        assert module.matthews_correlation(predicted, truth) == pytest.approx(
            matthews_corrcoef(truth, predicted), 1e-12
        )
    zeros, truth = np.zeros(20, dtype=np.int64), np.r_[np.zeros(10), np.ones(10)].astype(np.int64)
    assert module.f1(zeros, zeros) == f1_score(zeros, zeros, zero_division=0.0) == 0.0
    assert module.matthews_correlation(zeros, truth) == matthews_corrcoef(truth, zeros) == 0.0
    values = rng.normal(size=40)
    assert module.spearmanr(values, -values) == pytest.approx(-1.0, abs=1e-12)
    ties = rng.integers(0, 4, 60).astype(np.float64)
    other = ties + rng.integers(0, 3, 60)
    assert module.spearmanr(ties, other) == pytest.approx(spearmanr(ties, other).statistic, abs=1e-12)
    assert module.pearson(ties, other) == pytest.approx(pearsonr(ties, other).statistic, abs=1e-12)
    assert np.isnan(module.spearmanr(np.r_[values[:-1], np.nan], values))  # scipy: NaN in, NaN out
    assert np.isnan(module.pearson(np.ones(5), values[:5]))  # a constant prediction


def metric_module():
    """The metric module's own functions (what evaluate runs), imported from the package data."""
    import importlib.util

    from poet_peft.glue_metric import GLUE_METRIC_PATH

    spec = importlib.util.spec_from_file_location("glue_metric_module", GLUE_METRIC_PATH / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_glue_metric_unknown_configuration_names_the_choices():
    with pytest.raises(KeyError, match="configurations are: cola, sst2"):
        poet_peft.load_glue_metric("imdb")


# ----------------------------------------------------------------------------------------------------- the script
def test_poet_run_evaluates_each_epoch_keeps_the_best_and_matches_sklearn(models_dir, data_dir, tmp_path):
    """POET on a tiny BERT (sst2 CSV): two epochs, an evaluation after each, the best saved; metrics = sklearn's."""
    output_dir = tmp_path / "poet"
    flags = local_task(models_dir, data_dir, "sst2", ".csv")
    run_script(output_dir, *flags, "--method", "poet", "--block", "8", "--num_train_epochs", "2", "--seed", "3")
    lines = records(output_dir)
    evaluations = [line for line in lines if "eval/accuracy" in line]
    assert [line["step"] for line in evaluations] == [6, 12]  # 96 examples / 16 per batch = 6 steps per epoch
    assert [line["step"] for line in lines if "train/loss" in line] == [2, 4, 6, 8, 10, 12]
    results = json.loads((output_dir / "results.json").read_text())
    best = max(evaluations, key=lambda line: line["eval/accuracy"])
    assert results["best"]["eval/accuracy"] == best["eval/accuracy"] and results["best_step"] == best["step"]
    assert results["trainable_parameters"] == sum(
        p.numel()
        for p in get_peft_model(
            AutoModelForSequenceClassification.from_pretrained(models_dir / "bert", num_labels=2),
            poet_peft.POETConfig(block=8, task_type="SEQ_CLS"),
        ).parameters()
        if p.requires_grad
    )
    saved = json.loads((output_dir / "best" / "eval_results.json").read_text())
    validation = read_rows(data_dir / "sst2_validation.csv")
    predictions = validation_outputs(output_dir / "best", "sst2", validation).argmax(-1)
    labels = [row["label"] for row in validation]
    assert saved["metrics"]["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert saved["metrics"]["accuracy"] == best["eval/accuracy"] and saved["step"] == best["step"]
    assert saved["hyperparameters"]["method"] == "poet" and saved["hyperparameters"]["seed"] == 3


def test_full_finetuning_regression_on_json_matches_scipy(models_dir, data_dir, tmp_path):
    """Full finetuning of the tiny BERT on stsb (JSON, a regression head): Pearson and Spearman are scipy's."""
    output_dir = tmp_path / "full"
    run_script(output_dir, *local_task(models_dir, data_dir, "stsb", ".json"), "--method", "full")
    saved = json.loads((output_dir / "best" / "eval_results.json").read_text())
    assert not (output_dir / "best" / "adapter_config.json").exists()  # the whole model is saved
    validation = read_rows(data_dir / "stsb_validation.json")
    scores = validation_outputs(output_dir / "best", "stsb", validation)[:, 0]
    truth = [row["label"] for row in validation]
    assert saved["metrics"]["pearson"] == pytest.approx(pearsonr(scores, truth).statistic, abs=1e-5)
    assert saved["metrics"]["spearmanr"] == pytest.approx(spearmanr(scores, truth).statistic, abs=1e-5)


def test_oft_on_a_decoder_with_a_classification_head(models_dir, data_dir, tmp_path):
    """PEFT's OFT on a tiny LLaMA with no padding token (cola, JSON lines): MCC is sklearn's."""
    output_dir = tmp_path / "oft"
    flags = local_task(models_dir, data_dir, "cola", ".jsonl", model="llama")
    run_script(output_dir, *flags, "--method", "oft", "--block", "8")
    config = json.loads((output_dir / "best" / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["oft_block_size"] == 8
    saved = json.loads((output_dir / "best" / "eval_results.json").read_text())
    validation = read_rows(data_dir / "cola_validation.jsonl")
    predictions = validation_outputs(output_dir / "best", "cola", validation).argmax(-1)
    expected = matthews_corrcoef([row["label"] for row in validation], predictions)
    assert saved["metrics"]["matthews_correlation"] == pytest.approx(expected, abs=1e-12)


def test_lora_resumes_from_a_checkpoint_exactly(models_dir, data_dir, tmp_path):
    """LoRA on sentence pairs (mrpc TSV), 2-step accumulation: resumed at step 4, after epoch 1's evaluation and
    inside epoch 2, it logs the same losses and metrics and picks the same best as the uninterrupted run."""
    flags = [*local_task(models_dir, data_dir, "mrpc", ".tsv"), "--method", "lora", "--max_train_steps", "8"]
    flags += ["--gradient_accumulation_steps", "2"]  # 96 examples / 16 = 6 batches = 3 steps per epoch
    whole = tmp_path / "whole"
    run_script(whole, *flags, "--checkpointing_steps", "4")
    assert [path.name for path in sorted((whole / "checkpoints").iterdir())] == ["step_4", "step_8"]
    assert [line["step"] for line in records(whole) if "eval/f1" in line] == [3, 6, 8]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4")
    lines = [line for line in (whole / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run_script(resumed, *flags, "--resume_from_checkpoint", "latest")
    expected, got = records(whole), records(resumed)
    assert [line["step"] for line in got] == [line["step"] for line in expected]
    for a, b in zip(expected, got, strict=True):
        for key in a.keys() & {"train/loss", "eval/accuracy", "eval/f1", "eval/loss"}:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    summary, resumed_summary = (json.loads((path / "results.json").read_text()) for path in (whole, resumed))
    assert resumed_summary["best_step"] == summary["best_step"]
    assert resumed_summary["best"] == pytest.approx(summary["best"], abs=1e-5)


def test_two_processes_gather_every_validation_example_once(models_dir, data_dir, tmp_path):
    """Under a 2-process accelerate launch (gloo DDP), 37 validation examples in uneven batches are each counted
    once: the accuracy equals sklearn's on the saved model's predictions."""
    output_dir = tmp_path / "ddp"
    launcher = accelerate_launch(CPU_DDP_CONFIG)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    flags = [*local_task(models_dir, data_dir, "sst2", ".csv"), "--method", "poet", "--block", "8"]
    flags += ["--max_train_steps", "3", "--max_eval_samples", "37", "--per_device_eval_batch_size", "8"]
    result = subprocess.run(
        [*launcher, str(SCRIPT), "--output_dir", str(output_dir), *flags], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert "3 steps" in result.stdout and result.stdout.count('"best_step"') == 1  # one process reports
    saved = json.loads((output_dir / "best" / "eval_results.json").read_text())
    assert saved["hyperparameters"]["train_batch_size"] == 32  # 16 per process
    validation = read_rows(data_dir / "sst2_validation.csv")[:37]
    predictions = validation_outputs(output_dir / "best", "sst2", validation).argmax(-1)
    expected = accuracy_score([row["label"] for row in validation], predictions)
    assert saved["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert round(saved["metrics"]["accuracy"] * 37) == pytest.approx(saved["metrics"]["accuracy"] * 37, abs=1e-9)


def test_offline_demo_with_no_flags_finetunes_minilm_on_rotten_tomatoes(tmp_path):
    """No model or data flags: the installed all-MiniLM-L6-v2 and Rotten Tomatoes sentences, fully offline."""
    output_dir = tmp_path / "demo"
    result = run_script(output_dir, "--max_train_steps", "3", "--max_eval_samples", "64")
    assert "3,000 training and 64 validation examples" in result.stdout
    saved = json.loads((output_dir / "best" / "eval_results.json").read_text())
    assert saved["base_model"] == run_glue.DEMO_MODEL_HUB_ID
    assert set(saved["metrics"]) == {"accuracy", "f1", "matthews_correlation"}
    assert json.loads((output_dir / "best" / "adapter_config.json").read_text())["peft_type"] == "POET"
    data = run_glue.load_demo_data()
    assert (len(data["train"]), len(data["validation"])) == (11_752, 1_000)  # 12,752 distinct labelled sentences
    assert 0.5 < np.mean(data["train"]["label"]) < 0.65  # fresh: 58% of the reviews


def test_every_method_wraps_with_a_trained_head(models_dir):
    """full trains everything; lora, oft, poet and spectral_lora train the head and their adapters, not W."""
    args = run_glue.parse_args(["--method", "full"])
    model = AutoModelForSequenceClassification.from_pretrained(models_dir / "bert", num_labels=2)
    assert run_glue.wrap_model(model, args) is model and all(param.requires_grad for param in model.parameters())
    for method, peft_type in (("lora", "LORA"), ("oft", "OFT"), ("poet", "POET"), ("spectral_lora", "SPECTRAL_LORA")):
        args = run_glue.parse_args(["--method", method, "--block", "8", "--model_name_or_path", str(models_dir)])
        model = run_glue.wrap_model(
            AutoModelForSequenceClassification.from_pretrained(models_dir / "bert", num_labels=2), args
        )
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        assert model.peft_config["default"].peft_type == peft_type
        assert any("classifier.modules_to_save" in name for name in trainable), method
        assert not any(name.endswith("query.base_layer.weight") for name in trainable), method


def test_the_best_model_is_the_best_evaluation_not_the_last(models_dir, tmp_path, monkeypatch):
    """validate() keeps <output_dir>/best at the best main metric: a later, worse or NaN evaluation leaves it."""
    from accelerate import Accelerator

    args = run_glue.parse_args(["--method", "lora", "--task_name", "stsb", "--output_dir", str(tmp_path)])
    base = AutoModelForSequenceClassification.from_pretrained(models_dir / "bert", num_labels=1)
    model = run_glue.wrap_model(base, args)
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "bert")
    log = poet_peft.MetricsLog(Accelerator(cpu=True), tmp_path / "metrics.jsonl")
    position = {"completed_steps": 0, "best": None}
    for step, pearson in ((1, float("nan")), (2, 0.5), (3, 0.7), (4, 0.6), (5, float("nan"))):
        monkeypatch.setattr(run_glue, "evaluate", lambda *_, p=pearson: {"eval/pearson": p, "eval/loss": 1.0})
        position["completed_steps"] = step
        run_glue.validate(args, Accelerator(cpu=True), model, tokenizer, None, log, position, {"base_model": None})
        saved = json.loads((tmp_path / "best" / "eval_results.json").read_text())
        assert saved["step"] == position["best"]["step"] == {1: 1, 2: 2, 3: 3, 4: 3, 5: 3}[step]
    assert position["last_eval"]["eval/pearson"] != position["last_eval"]["eval/pearson"]  # the last was NaN
    assert run_glue.improves(0.1, float("nan")) and not run_glue.improves(float("nan"), 0.1)


def test_method_flags_reach_the_optimizer_and_the_adapter(models_dir):
    """--poet_lr sets Q's group apart from the head's lr; --magnitude_lr_ratio and --lora_sigma_max reach theirs."""
    base = AutoModelForSequenceClassification.from_pretrained(models_dir / "bert", num_labels=2)
    args = run_glue.parse_args(["--method", "poet", "--block", "8", "--learning_rate", "1e-3", "--poet_lr", "1e-5"])
    groups = {
        group["name"]: group["lr"] for group in run_glue.param_groups(run_glue.wrap_model(base, args), args, 1e-3)
    }
    assert groups == {"matrices": 1e-3, "vectors": 1e-3, "poet": 1e-5}
    base = AutoModelForSequenceClassification.from_pretrained(models_dir / "bert", num_labels=2)
    flags = ["--method", "spectral_lora", "--magnitude_lr_ratio", "3", "--lora_sigma_max", "none"]
    args = run_glue.parse_args(flags)
    model = run_glue.wrap_model(base, args)
    assert {group["name"]: group["lr"] for group in run_glue.param_groups(model, args, 2e-3)}["magnitude"] == 6e-3
    assert model.peft_config["default"].sigma_max is None


# ----------------------------------------------------------------------------------------------------- bad input
def test_unknown_task_and_bad_flags_are_refused_with_the_choices(capsys):
    for flags, message in (
        (["--task_name", "imdb"], "invalid choice: 'imdb' (choose from 'cola', 'sst2'"),
        (["--train_file", "x.csv"], "--train_file needs --task_name"),
        (["--method", "oft", "--block", "1/2"], "OFT takes an integer block size"),
        (["--method", "lora", "--spec-source", "grad"], "use --spec-source weight, or --method full"),
        (["--validation_file", "x.csv"], "--validation_file needs --train_file"),
    ):
        with pytest.raises(SystemExit):
            run_glue.parse_args(flags)
        assert message in capsys.readouterr().err


def test_missing_label_column_names_the_file_and_the_columns(data_dir, tmp_path):
    no_label = tmp_path / "unlabelled.csv"
    no_label.write_text("sentence,score\nthe film was good,1\nthe film was bad,0\n")
    args = run_glue.parse_args(["--task_name", "sst2", "--train_file", str(data_dir / "sst2_train.csv")])
    args.validation_file = str(no_label)
    with pytest.raises(ValueError, match=r"unlabelled.csv \(validation\) has no column 'label': task sst2 needs "):
        run_glue.load_raw_splits(args)
    args = run_glue.parse_args(["--task_name", "mrpc", "--train_file", str(data_dir / "sst2_train.csv")])
    with pytest.raises(ValueError, match="no column 'sentence1', 'sentence2'.*the data has sentence, label"):
        run_glue.load_raw_splits(args)
    names = tmp_path / "names.tsv"  # raw MNLI-style text labels
    names.write_text("premise\thypothesis\tlabel\na film\ta story\tentailment\na plot\tthe cast\tneutral\n")
    args = run_glue.parse_args(["--task_name", "mnli", "--train_file", str(names)])
    refused = r"names.tsv \(train\): labels '\w+'.* are not valid for mnli: use class ids 0 \(entailment\), 1 \(neutral"
    with pytest.raises(ValueError, match=refused):
        run_glue.load_raw_splits(args)
    out_of_range = tmp_path / "three.csv"
    out_of_range.write_text("sentence,label\na,0\nb,1\nc,2\nd,1\ne,0\nf,1\ng,0\nh,1\ni,0\nj,1\n")
    args = run_glue.parse_args(["--task_name", "sst2", "--train_file", str(out_of_range)])
    with pytest.raises(ValueError, match=r"labels 2 are not valid for sst2: use class ids 0 \(negative\), 1"):
        run_glue.load_raw_splits(args)
    args = run_glue.parse_args(["--task_name", "sst2", "--train_file", str(tmp_path / "train.parquet")])
    with pytest.raises(ValueError, match=r"unsupported file type '.parquet'; use .csv, .tsv, .json, .jsonl"):
        run_glue.load_raw_splits(args)


# ------------------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def poet_adapter(models_dir, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A POET adapter on the tiny BERT with moved rotations and a trained head, saved as run_glue saves its best."""
    base = AutoModelForSequenceClassification.from_pretrained(
        models_dir / "bert",
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    model = get_peft_model(base, poet_peft.POETConfig(block=8, task_type="SEQ_CLS", merge_every=None))
    randomize_skew(model, 0.05)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "classifier.modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
    folder = tmp_path_factory.mktemp("adapter") / "best"
    results = {
        "metrics": {"accuracy": 0.875, "f1": 0.8},
        "dataset": {"id": "nyu-mll/glue", "config": "sst2", "split": "validation", "name": "GLUE SST2"},
        "task_type": "SEQ_CLS",
        "base_model": "google-bert/bert-base-uncased",
        "hyperparameters": {"learning_rate": 5e-4, "seed": 0},
    }
    poet_peft.save_finetuned(model, AutoTokenizer.from_pretrained(models_dir / "bert"), folder, results)
    batch = AutoTokenizer.from_pretrained(models_dir / "bert")(
        ["the film was good", "a dull plot and weak cast"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model.eval()(**batch).logits
        with model.disable_adapter():
            base_logits = model(**batch).logits
    assert (logits - base_logits).abs().max() > 0.05  # the rotations and the head moved the outputs (≫ 1e-5)
    return folder, logits


def test_export_loads_without_poet_peft_and_matches_the_peft_model(poet_adapter, tmp_path):
    """The merged folder loads with plain Transformers in a process that never imports poet_peft; logits 1e-5."""
    folder, expected = poet_adapter
    out = tmp_path / "merged"
    subprocess.run(
        [sys.executable, "-m", "poet_peft_cli", "export", "--adapter", str(folder), "--out", str(out)],
        check=True,
        capture_output=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "eval_results.json"} <= {
        path.name for path in out.iterdir()
    }
    logits = run_fresh_python(
        f"""
        import json, sys, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()
        batch = AutoTokenizer.from_pretrained({str(out)!r})(
            ["the film was good", "a dull plot and weak cast"], padding=True, return_tensors="pt"
        )
        assert "poet_peft" not in sys.modules and "peft" not in sys.modules
        assert model.config.id2label == {{0: "negative", 1: "positive"}}
        with torch.no_grad():
            print(json.dumps(model(**batch).logits.tolist()))
        """
    )
    assert torch.allclose(torch.tensor(json.loads(logits)), expected, atol=1e-5)


def test_model_card_yaml_names_base_model_method_data_metrics_and_hyperparameters(poet_adapter, tmp_path):
    folder, _ = poet_adapter
    out = poet_peft.export_merged(folder, tmp_path / "merged")
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model"] == "google-bert/bert-base-uncased"
    assert {"poet-peft", "peft", "poet"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["nyu-mll/glue"] and metadata["metrics"] == ["accuracy", "f1"]
    assert metadata["hyperparameters"]["block"] == 8 and metadata["hyperparameters"]["peft_type"] == "POET"
    assert metadata["hyperparameters"]["learning_rate"] == 5e-4
    results = metadata["model-index"][0]["results"]
    assert {(r["dataset"]["config"], m["type"], m["value"]) for r in results for m in r["metrics"]} == {
        ("sst2", "accuracy", 0.875),
        ("sst2", "f1", 0.8),
    }
    card = ModelCard.load(out / "README.md")  # huggingface_hub's own parser agrees
    assert card.data.base_model == "google-bert/bert-base-uncased" and card.data.eval_results[0].metric_value == 0.875
    assert json.loads((out / "eval_results.json").read_text())["metrics"]["accuracy"] == 0.875


def test_export_of_a_causal_lm_writes_a_generation_config_and_matches(models_dir, tmp_path):
    """A POET adapter on a causal LM: merged weights, generation_config.json, the same logits in plain Transformers."""
    base_dir = tmp_path / "llama"
    tiny_llama(hidden=32, ffn=64).save_pretrained(base_dir)
    write_tokenizer(base_dir)
    model = get_peft_model(
        tiny_llama(hidden=32, ffn=64), poet_peft.POETConfig(block=8, task_type="CAUSAL_LM", merge_every=None)
    )
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    randomize_skew(model, 0.05)
    tokens = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(input_ids=tokens).logits
    poet_peft.save_finetuned(model, AutoTokenizer.from_pretrained(base_dir), tmp_path / "adapter")
    out = poet_peft.export_merged(tmp_path / "adapter", tmp_path / "merged")
    assert (out / "generation_config.json").is_file()
    metadata = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert metadata["pipeline_tag"] == "text-generation" and "base_model" not in metadata  # a local base: no Hub id
    logits = run_fresh_python(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, GenerationConfig
        GenerationConfig.from_pretrained({str(out)!r})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        with torch.no_grad():
            print(json.dumps(model(input_ids=torch.tensor({tokens.tolist()})).logits.tolist()))
        """
    )
    assert torch.allclose(torch.tensor(json.loads(logits)), expected, atol=1e-5)


def test_export_of_a_gpt2_classifier_reads_its_config_names(tmp_path):
    """GPT-2 names its sizes n_embd, n_layer, …: the base check reads them through its config; the export matches."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

    config = GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=2, n_positions=32, pad_token_id=0)
    torch.manual_seed(0)
    GPT2Model(config).save_pretrained(tmp_path / "gpt2")
    write_tokenizer(tmp_path / "gpt2")
    base = GPT2ForSequenceClassification.from_pretrained(tmp_path / "gpt2", num_labels=3)
    model = get_peft_model(base, poet_peft.POETConfig(block=8, task_type="SEQ_CLS", merge_every=None))
    randomize_skew(model, 0.05)
    tokens = torch.randint(1, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(input_ids=tokens).logits
    poet_peft.save_finetuned(model, AutoTokenizer.from_pretrained(tmp_path / "gpt2"), tmp_path / "adapter")
    merged, settings, _ = poet_peft.load_merged(tmp_path / "adapter")
    assert settings["peft_type"] == "POET"
    with torch.no_grad():
        assert torch.allclose(merged.eval()(input_ids=tokens).logits, expected, atol=1e-5)
    other = GPT2Config(vocab_size=32, n_embd=48, n_layer=2, n_head=2, n_positions=32)
    GPT2Model(other).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="hidden_size 32 ≠ 48"):
        poet_peft.load_merged(tmp_path / "adapter", base_model=str(tmp_path / "wide"))


def test_a_failed_export_leaves_no_partial_folder(poet_adapter, tmp_path, monkeypatch):
    folder, _ = poet_adapter

    def broken_card(*args):
        raise OSError("disk full")

    monkeypatch.setattr(poet_peft.export, "model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        poet_peft.export_merged(folder, tmp_path / "merged")
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_export_refuses_to_write_over_its_own_adapter(poet_adapter):
    folder, _ = poet_adapter
    for out in (folder, folder.parent):
        with pytest.raises(ValueError, match="would write into or over the adapter folder"):
            poet_peft.export_merged(folder, out, overwrite=True)
    assert (folder / "adapter_model.safetensors").is_file()


def test_export_of_a_fully_finetuned_model(models_dir, tmp_path):
    """A full-finetuning folder has nothing to merge: it is copied with a model card, weights unchanged."""
    model = AutoModelForSequenceClassification.from_pretrained(models_dir / "bert", num_labels=2)
    poet_peft.save_finetuned(model, AutoTokenizer.from_pretrained(models_dir / "bert"), tmp_path / "full")
    out = poet_peft.export_merged(tmp_path / "full", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), merged.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert "full-finetuning" in yaml.safe_load((out / "README.md").read_text().split("---\n")[1])["tags"]


def test_export_refuses_a_mismatched_base_model(poet_adapter, models_dir, tmp_path):
    folder, _ = poet_adapter
    with pytest.raises(ValueError, match=r"trained on another base model .*hidden_size 32 ≠ 48"):
        poet_peft.export_merged(folder, tmp_path / "out", base_model=str(models_dir / "bert48"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    bare = tmp_path / "bare"  # without the saved model config, PEFT's own load fails: still named clearly
    shutil.copytree(folder, bare)
    (bare / "model_config.json").unlink()
    with pytest.raises(ValueError, match="does not fit base model"):
        poet_peft.load_merged(bare, base_model=str(models_dir / "bert48"))
    with pytest.raises(FileNotFoundError, match="neither an adapter"):
        poet_peft.load_merged(tmp_path)


def test_export_refuses_to_overwrite_and_offline_push_keeps_the_folder(poet_adapter, tmp_path):
    """An existing --out is kept unless --overwrite; a push that cannot reach the Hub fails clearly, folder intact."""
    folder, _ = poet_adapter
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    command = [sys.executable, "-m", "poet_peft_cli", "export", "--adapter", str(folder), "--out", str(out)]
    refused = subprocess.run(command, capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr
    assert (out / "notes.txt").read_text() == "mine"
    pushed = subprocess.run(
        [*command, "--overwrite", "--push-to-hub", "me/poet-sst2"], capture_output=True, text=True, env=env
    )
    assert pushed.returncode == 2
    assert "could not push" in pushed.stderr and "OfflineModeIsEnabled" in pushed.stderr
    assert f"hf upload me/poet-sst2 {out}" in pushed.stderr
    assert {"model.safetensors", "config.json", "README.md"} <= {path.name for path in out.iterdir()}
    assert yaml.safe_load((out / "README.md").read_text().split("---\n")[1])["model-index"][0]["name"] == "me/poet-sst2"
    AutoModelForSequenceClassification.from_pretrained(out)  # complete and loadable
