"""POETModel: injects POETLinear layers into a model, following PEFT's tuner protocol."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ...guards import raise_unless_permutation
from ..linear import LinearTuner
from .layer import POETLinear

BASE_WEIGHT = "base_layer.weight"
_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BERT_STYLE = ("query", "key", "value", "output.dense", "intermediate.dense")

# The transformer-block linear layers of each architecture; embeddings and output heads stay unwrapped.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "bert": _BERT_STYLE,
    "roberta": _BERT_STYLE,
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def poet_layers(model: nn.Module) -> Iterator[POETLinear]:
    """Every POET layer in a model, wrapped (DDP, PeftModel, …) or not."""
    return (module for module in model.modules() if isinstance(module, POETLinear))


def poet_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The skew parameters (Q) of the active POET adapters in a model: what POET trains and what merges reset."""
    return [param for layer in poet_layers(model) for param in layer.skew_parameters()]


class POETModel(LinearTuner):
    """The PEFT tuner for POET; `get_peft_model(model, POETConfig(...))` builds it."""

    method = "POET"
    target_forms = "a list of names, a regex, or 'all-linear'"
    prefix = "poet_"
    tuner_layer_cls = POETLinear
    target_module_mapping = DEFAULT_TARGET_MODULES

    def initialize_injected(self, model: nn.Module, adapter_name: str) -> None:
        """Redraw W0 where init_weights says so and store it in base_dtype, once every target has been wrapped."""
        base_dtype = self.peft_config[adapter_name].base_dtype
        for layer in poet_layers(model):
            if adapter_name in layer.poet_config:
                layer.initialize_base_weight(adapter_name)
                if base_dtype is not None:
                    layer.cast_base_weight(getattr(torch, base_dtype))

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # Once merges (or a fresh init) have rewritten W0, Q alone no longer reproduces the model: carry W0 too.
        for name, layer in model.named_modules():
            if not (isinstance(layer, POETLinear) and bool(layer.poet_base_rewritten)):
                continue
            key = f"{name.replace('_fsdp_wrapped_module.', '')}.{BASE_WEIGHT}"
            if key not in state_dict:
                raise KeyError(
                    f"POET must save the merged W0 of {name}, but the state dict being saved has no {key!r}; "
                    "without it the adapter file could not reproduce the model."
                )
            to_return[key] = layer.base_weight_for_saving() if layer.merged else state_dict[key]
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        layers = {name: m for name, m in model.named_modules() if isinstance(m, POETLinear)}
        for key, tensor in state_dict.items():
            _check_permutation(key, tensor, layers)
            name = key.removesuffix("." + BASE_WEIGHT)
            layer = layers.get(name, layers.get(name.removeprefix("base_model.model."))) if name != key else None
            others = set(layer.poet_config) - {adapter_name} if layer is not None else set()
            if others:
                raise ValueError(
                    f"Adapter {adapter_name!r} carries its own W0 for {name} (it was "
                    f"merged during training), and loading it would overwrite the W0 that adapter(s) "
                    f"{', '.join(sorted(others))} build on. Load it into a fresh base model instead."
                )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _check_permutation(key: str, tensor: torch.Tensor, layers: dict[str, POETLinear]) -> None:
    # A permutation with a repeated index loads and silently computes another function; an out-of-range one fails
    # later inside an index op. Check each saved one against the layer it is for.
    for name, size_of in (("poet_perm_out", "out_features"), ("poet_perm_in", "in_features")):
        if key.endswith("." + name):
            path = key.removesuffix("." + name)
            layer = layers.get(path, layers.get(path.removeprefix("base_model.model.")))
            if layer is not None:
                where = f"{key} in the adapter file (layer {layer.layer_key})"
                raise_unless_permutation(tensor, getattr(layer, size_of), where)
