"""ORAModel: replaces a model's Q and K projections by fixed random ones, following PEFT's tuner protocol."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ...guards import raise_if_nonfinite
from ..linear import LinearTuner
from .config import ORAConfig
from .layer import ORALinear

_LLAMA_STYLE = ("q_proj", "k_proj")

# The query and key projections of each architecture.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "opt": _LLAMA_STYLE,
    "gpt2": ("c_attn",),
    "bert": ("query", "key"),
    "roberta": ("query", "key"),
}
# Targets whose output is [Q; K; V] in equal thirds.
DEFAULT_FUSED_QKV_MODULES: dict[str, tuple[str, ...]] = {"gpt2": ("c_attn",)}


def ora_layers(model: nn.Module) -> Iterator[ORALinear]:
    """Every ORA layer in a model, wrapped (DDP, PeftModel, …) or not."""
    return (module for module in model.modules() if isinstance(module, ORALinear))


class ORAModel(LinearTuner):
    """The PEFT tuner for ORA; `get_peft_model(model, ORAConfig(...))` builds it.

    ORA is a reparameterisation for training, not an add-on: the drawn Q/K overwrite the base weights, every
    other parameter of the model trains, and the adapter file holds all of them except the regenerable Q/K.
    """

    method = "ORA"
    prefix = "ora_"
    tuner_layer_cls = ORALinear
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: ORAConfig, model_config: dict) -> ORAConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if peft_config.fused_qkv_modules is None:
            peft_config.fused_qkv_modules = list(DEFAULT_FUSED_QKV_MODULES.get(model_config.get("model_type"), ()))
        return peft_config

    def _check_new_adapter_config(self, config: ORAConfig) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(
                f"A model takes one ORA adapter; it already has {next(iter(self.peft_config))!r}. ORA overwrites the "
                "Q/K weights in place, so a second draw would replace the first. Build a fresh model instead."
            )

    def initialize_injected(self, model: nn.Module, adapter_name: str) -> None:
        """Draw Q/K into the wrapped layers: the draws overwrite base weights, so only once all are wrapped."""
        for layer in ora_layers(model):
            layer.draw_projections(adapter_name)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        self.check_wrappable(target, current_key)
        fused = target_name in peft_config.fused_qkv_modules
        new_module = ORALinear(target, adapter_name, peft_config, layer_key=current_key, fused=fused)
        self._replace_module(parent, target_name, new_module, target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        inference = any(config.inference_mode for config in self.peft_config.values())
        self._set_trainable(model, not inference)

    @staticmethod
    def _set_trainable(model: nn.Module, trainable: bool) -> None:
        # Unlike an additive adapter, ORA trains the whole model except the fixed Q/K.
        for param in model.parameters():
            param.requires_grad_(trainable)
        for layer in ora_layers(model):
            for param in layer.fixed_parameters():
                param.requires_grad_(False)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Activate the adapter; every parameter but the fixed Q/K trains, or none does with `inference_mode`."""
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._set_trainable(self.model, not inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Start or stop training ORA's parameters: the whole model except the fixed Q/K."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"No ORA adapter named {unknown}; this model has {list(self.peft_config)}.")
        self._set_trainable(self.model, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Not available for ORA: its draws and trained weights are the model now."""
        raise ValueError(
            f"ORA adapter {adapter_name!r} cannot be deleted: it overwrote the Q/K weights in place and its trained "
            "weights are the rest of the model. merge_and_unload() returns the trained model as a plain "
            "transformers model; load the base model again for its original Q/K."
        )

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if not enabled:
            raise ValueError(
                "ORA adapters cannot be disabled: ORA overwrote the Q/K weights in place, so there is no original "
                "model to fall back to. Load the base model again for its original Q/K."
            )
        super()._enable_adapter_layers(enabled)

    def unload(self) -> nn.Module:
        """Not available for ORA: use `merge_and_unload()`, which returns the plain model with ORA's weights."""
        raise ValueError(
            "ORA has no base model to unload to: it overwrote the Q/K weights in place. merge_and_unload() returns "
            "the trained model as a plain transformers model."
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A saved adapter's V/O/FFN weights were trained against its draws: refuse to pair them with other ones. Only
        # this module sees every key (torch hands each child its own), hence the check here rather than per layer.
        if any("ora_draw_checksum" in key for key in state_dict):
            layers = ((name, layer) for name, layer in self.model.named_modules() if isinstance(layer, ORALinear))
            for name, layer in layers:
                key = f"{prefix}model.{name}.ora_draw_checksum."
                problem = layer.draw_mismatch(
                    {adapter: state_dict.get(key + adapter) for adapter in layer.ora_draw_checksum}
                )
                if problem:
                    raise ValueError(
                        f"{problem}. The draws follow the seed and each layer's module path: load the adapter into "
                        "the same model class it was trained on (e.g. AutoModelForCausalLM, not AutoModel), with a "
                        "torch whose CPU generator draws the same."
                    )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # Everything that trained, which is everything except the Q/K that the seed regenerates.
        regenerated = _regenerated_keys(model)
        to_return = {key: value for key, value in state_dict.items() if key not in regenerated}
        raise_if_nonfinite(to_return.items(), "to save the adapter")
        return to_return

    @classmethod
    def _expected_adapter_keys(cls, model: nn.Module, config, adapter_name: str) -> set[str]:
        """Everything an ORA adapter file holds: every tensor of the model but the regenerable Q/K."""
        return set(model.state_dict()) - _regenerated_keys(model)


def _regenerated_keys(model: nn.Module) -> set[str]:
    # The state-dict keys of the fixed Q/K weights (and biases), which the seed draws again at load time.
    keys = set()
    for name, layer in model.named_modules():
        if isinstance(layer, ORALinear) and layer.fixed_parameters():
            name = name.replace("_fsdp_wrapped_module.", "")
            keys.update(f"{name}.base_layer.{part}" for part in ("weight", "bias"))
    return keys
