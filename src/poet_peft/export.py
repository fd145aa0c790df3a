"""Finetuned folders and Hub-ready merged checkpoints.

`save_finetuned` writes what a finetuning run produces: a PEFT adapter (or a fully finetuned model), the tokenizer,
the model config it was trained with (labels, padding token) and the evaluation results. `export_merged` turns such a
folder into a plain Transformers checkpoint: merged safetensors weights, config, tokenizer, generation config and a
model card with YAML metadata. It loads with `AutoModel….from_pretrained` where poet_peft is not installed, and
`push_to_hub` uploads it with huggingface_hub.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
import transformers
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoTokenizer

from .guards import raise_if_nonfinite

PathLike = Union[str, os.PathLike]
MODEL_CONFIG = "model_config.json"
EVAL_RESULTS = "eval_results.json"
# The config fields that decide whether an adapter's weights fit a base model (read through each config class's own
# attribute map, so GPT-2's n_embd counts as hidden_size).
SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)
# The finetuned model's own fields, which the base's config does not have (a fresh classification head's labels).
HEAD_FIELDS = ("id2label", "label2id", "problem_type", "pad_token_id")
AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
PIPELINE_TAGS = {"SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation", "TOKEN_CLS": "token-classification"}
# PEFT's bookkeeping, not training choices: left out of the model card's hyperparameters.
BOOKKEEPING_FIELDS = {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version"}


class HubPushError(RuntimeError):
    """The upload to the Hub failed; the exported folder is complete and untouched."""


def replace_folder(partial: Path, destination: Path) -> None:
    """Move a completely written folder into place, so that a crash leaves either the old folder or the new one."""
    previous = destination.with_name(destination.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)  # left by a crash between the two renames below
    if destination.exists():
        os.replace(destination, previous)
    os.replace(partial, destination)
    shutil.rmtree(previous, ignore_errors=True)


def save_finetuned(model: torch.nn.Module, tokenizer, folder: PathLike, eval_results: Optional[dict] = None) -> Path:
    """Save a finetuned model (its PEFT adapter, or all of it), tokenizer, model config and eval results, atomically.

    `eval_results` is what the model card reports: {"metrics": {...}, "dataset": {"id", "config", "split", "name"},
    "task_type", "base_model" (the base's Hub id when it was loaded from a local folder), "hyperparameters": {...}}.
    """
    folder = Path(folder)
    raise_if_nonfinite(model.state_dict().items(), f"to save {folder}")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if isinstance(model, PeftModel):
        model_config = model.get_base_model().config
        (partial / MODEL_CONFIG).write_text(model_config.to_json_string(use_diff=False))
    if eval_results is not None:
        (partial / EVAL_RESULTS).write_text(json.dumps(eval_results, indent=2))
    replace_folder(partial, folder)
    return folder


def _model_class(task_type: Optional[str], config, folder: Path):
    # PEFT's task_type names the Auto class; without one, the base's own architecture (a Quickstart adapter on a
    # causal LM must not come back as a bare AutoModel without its lm_head).
    if task_type:
        return getattr(transformers, AUTO_CLASSES.get(task_type, "AutoModel"))
    architectures = [name for name in (config.architectures or []) if hasattr(transformers, name)]
    if not architectures:
        raise ValueError(
            f"{folder}/adapter_config.json has no task_type and the base's config.json names no architecture that "
            "transformers knows: set task_type in the adapter config (e.g. 'CAUSAL_LM', 'SEQ_CLS')."
        )
    return getattr(transformers, architectures[0])


def _base_config(folder: Path, base: str):
    """The base model's config with the finetuned head's fields; refuses a base whose shapes the adapter cannot fit."""
    try:
        config = AutoConfig.from_pretrained(base)
    except OSError as error:
        raise FileNotFoundError(f"base model {base!r} cannot be loaded: {error}") from error
    saved_path = folder / MODEL_CONFIG
    if not saved_path.is_file():
        return config
    saved = json.loads(saved_path.read_text())
    trained = type(config).from_dict(saved) if saved.get("model_type") == config.model_type else None
    found = {field: getattr(config, field, None) for field in SHAPE_FIELDS}
    wanted = {field: getattr(trained, field, None) for field in SHAPE_FIELDS}
    wanted["model_type"] = saved.get("model_type")
    if found["model_type"] != wanted["model_type"]:
        raise ValueError(
            f"the adapter in {folder} was trained on a {wanted['model_type']} model, but {base!r} is a "
            f"{found['model_type']}: pass the base it was trained on ({saved.get('_name_or_path')!r}) with --base"
        )
    if found != wanted:
        differ = ", ".join(
            f"{field} {wanted[field]} ≠ {found[field]}" for field in SHAPE_FIELDS if found[field] != wanted[field]
        )
        raise ValueError(
            f"the adapter in {folder} was trained on another base model than {base!r} ({differ}): pass the base it "
            f"was trained on ({saved.get('_name_or_path')!r}) with --base"
        )
    for field in HEAD_FIELDS:
        if field in saved:
            setattr(config, field, getattr(trained, field))
    return config


def load_merged(folder: PathLike, base_model: Optional[str] = None) -> tuple[torch.nn.Module, dict, Optional[str]]:
    """The model saved in `folder` with any adapter merged into its weights, its PEFT settings ({} if none) and base.

    `base_model` replaces the base that the adapter_config.json names (a local copy of it, say).
    """
    model, settings, base = _load_finetuned(Path(folder), base_model)
    return (model.merge_and_unload() if isinstance(model, PeftModel) else model), settings, base


def _load_finetuned(folder: Path, base_model: Optional[str]) -> tuple[torch.nn.Module, dict, Optional[str]]:
    # load_merged before the merge: the PeftModel (or the fully finetuned model), its settings and base.
    if not (folder / "adapter_config.json").is_file():
        if (folder / "config.json").is_file():  # a fully finetuned model: nothing to merge
            config = AutoConfig.from_pretrained(folder)
            architecture = getattr(transformers, (config.architectures or ["AutoModel"])[0])
            return architecture.from_pretrained(folder), {}, None
        raise FileNotFoundError(f"{folder}: neither an adapter (adapter_config.json) nor a model (config.json)")
    peft_config = PeftConfig.from_pretrained(folder)
    base = base_model or peft_config.base_model_name_or_path
    if not base:
        raise ValueError(f"{folder}/adapter_config.json names no base model: pass one with --base")
    settings = _yaml_ready({k: v for k, v in peft_config.to_dict().items() if k not in BOOKKEEPING_FIELDS})
    config = _base_config(folder, base)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # not "newly initialized" for a head that the adapter holds
    try:  # a base with a head of another size (--ignore_mismatched_sizes in run_glue): the adapter holds the new one
        model = _model_class(settings.get("task_type"), config, folder).from_pretrained(
            base, config=config, ignore_mismatched_sizes=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    try:
        peft_model = PeftModel.from_pretrained(model, folder)
    except (RuntimeError, ValueError) as error:  # shapes that do not fit, target modules that do not exist
        raise ValueError(f"the adapter in {folder} does not fit base model {base!r}: {error}") from error
    return peft_model, settings, base


@torch.no_grad()
def _probe_outputs(model: torch.nn.Module) -> torch.Tensor:
    # The model's first output (logits, or hidden states for a bare encoder) on fixed token ids.
    vocab = model.get_input_embeddings().num_embeddings
    tokens = (torch.arange(16) * 7919 % vocab).unsqueeze(0).to(model.device)
    outputs = model.eval()(input_ids=tokens)
    return (outputs.logits if getattr(outputs, "logits", None) is not None else outputs[0]).float().cpu()


def _raise_unless_same_outputs(reference: torch.Tensor, exported: torch.Tensor, folder: Path) -> None:
    scale = reference.abs().max().item()
    if reference.shape != exported.shape or not torch.allclose(exported, reference, rtol=1e-4, atol=1e-5 * scale):
        error = (exported - reference).abs().max().item() if reference.shape == exported.shape else float("inf")
        raise ValueError(
            f"the exported model in {folder} does not compute what the adapter does (largest logit difference "
            f"{error:.3g}, logits up to {scale:.3g}): nothing was written. Report this as a bug."
        )


def _yaml_ready(value):
    """Sets as sorted lists, enums as their values, no Nones: plain YAML for the model card."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {key: _yaml_ready(item) for key, item in value.items() if item is not None}
    return value


def model_card(name: str, base: Optional[str], settings: dict, results: dict) -> ModelCard:
    """The model card: YAML metadata (library, base model, tags, datasets, metrics, hyperparameters) and a summary."""
    method = str(results.get("method") or settings.get("peft_type") or "full finetuning")
    task_type = settings.get("task_type") or results.get("task_type")
    dataset = results.get("dataset") or {}
    metrics = results.get("metrics") or {}
    hyperparameters = _yaml_ready({**settings, **results.get("hyperparameters", {})})
    evaluations = [
        EvalResult(
            task_type=PIPELINE_TAGS.get(task_type, "text-classification"),
            dataset_type=dataset.get("id") or "local",  # data that is not on the Hub: the card names it only
            dataset_name=dataset.get("name") or dataset["id"],
            dataset_config=dataset.get("config"),
            dataset_split=dataset.get("split"),
            metric_type=metric,
            metric_value=value,
        )
        for metric, value in metrics.items()
        if dataset.get("id") or dataset.get("name")
    ]
    data = ModelCardData(
        library_name="transformers",
        base_model=base,
        tags=["poet-peft", "peft", method.lower().replace("_", "-").replace(" ", "-")],
        datasets=[dataset["id"]] if dataset.get("id") else None,
        metrics=list(metrics) or None,
        pipeline_tag=PIPELINE_TAGS.get(task_type),
        model_name=name,
        eval_results=evaluations or None,
        hyperparameters=hyperparameters,
    )
    results_table = "".join(f"| {metric} | {value:.4f} |\n" for metric, value in metrics.items())
    trained_on = f" on {dataset.get('name') or dataset.get('id')}" if dataset else ""
    lines = [
        f"# {name}",
        "",
        f"{base or 'A model'} {results.get('training', 'finetuned')} with {method}{trained_on} using poet-peft, with "
        "any adapter merged into the weights: it loads with plain Transformers and needs no plugin.",
        "",
        "```python",
        f"from transformers import {AUTO_CLASSES.get(task_type, 'AutoModel')}, AutoTokenizer",
        f'model = {AUTO_CLASSES.get(task_type, "AutoModel")}.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
    ]
    if metrics:
        split = f" ({dataset.get('split')} split)" if dataset.get("split") else ""
        lines += ["", f"## Evaluation{split}", "", "| metric | value |", "|---|---|", results_table.rstrip("\n")]
    lines += ["", "## Training hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in hyperparameters.items()]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _nested(out: Path, folder: Path) -> bool:
    # Whether writing `out` (replacing it whole) would touch `folder`: the same folder, one inside it, or above it.
    out, folder = out.resolve(), folder.resolve()
    return out == folder or folder in out.parents or out in folder.parents


def export_merged(
    adapter: PathLike,
    output_dir: PathLike,
    base_model: Optional[str] = None,
    push_to_hub: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write a merged, Hub-ready checkpoint of a finetuned folder; with `push_to_hub` (a repo id) also upload it.

    The folder is written completely before any upload, so a failed push (offline, no token) keeps it: the error,
    HubPushError, says how to upload it later.
    """
    adapter, output_dir = Path(adapter), Path(output_dir)
    if _nested(output_dir, adapter):
        raise ValueError(f"--out {output_dir} would write into or over the adapter folder {adapter}: choose another")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--out {output_dir} is a file: choose a folder")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty: choose another --out, or pass --overwrite")
    finetuned, settings, base = _load_finetuned(adapter, base_model)
    if base and Path(base).exists() and _nested(output_dir, Path(base)):
        raise ValueError(f"--out {output_dir} would write into or over the base model's folder {base}: choose another")
    reference = _probe_outputs(finetuned)
    model = finetuned.merge_and_unload() if isinstance(finetuned, PeftModel) else finetuned
    raise_if_nonfinite(model.state_dict().items(), f"to export {adapter}")
    results = json.loads((adapter / EVAL_RESULTS).read_text()) if (adapter / EVAL_RESULTS).is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else base)
    # The card names a Hub id: the one the run recorded, or the base itself unless that is a local folder.
    card_base = results.get("base_model") or (base if base and not Path(base).exists() else None)
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)  # safetensors, config.json and, for generative models, generation_config.json
        _raise_unless_same_outputs(reference, _probe_outputs(type(model).from_pretrained(partial)), output_dir)
        tokenizer.save_pretrained(partial)
        if results:
            (partial / EVAL_RESULTS).write_text(json.dumps(results, indent=2))
        model_card(push_to_hub or output_dir.name, card_base, settings, results).save(partial / "README.md")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace_folder(partial, output_dir)
    if push_to_hub:
        push_folder(output_dir, push_to_hub)
    return output_dir


def push_folder(folder: PathLike, repo_id: str) -> str:
    """Upload a folder to a Hub model repository (created if missing); returns the commit URL."""
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload merged model")
    except Exception as error:  # offline, no token, no permission, …: each leaves the folder as it is
        reason = f"{type(error).__name__}: {str(error).rstrip('.')}"
        raise HubPushError(
            f"could not push {folder} to the Hub repository {repo_id!r}: {reason}. The merged "
            f"model is complete in {folder}; upload it later with `hf upload {repo_id} {folder}` (after `hf auth "
            "login`)."
        ) from error
