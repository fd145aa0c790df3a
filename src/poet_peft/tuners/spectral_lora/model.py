"""SpectralLoRAModel: injects SpectralLoRALinear layers into a model, following PEFT's tuner protocol."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..linear import LinearTuner
from ..poet.model import DEFAULT_TARGET_MODULES
from .config import SpectralLoRAConfig
from .layer import SpectralLoRALinear


def spectral_lora_layers(model: nn.Module) -> Iterator[SpectralLoRALinear]:
    """Every spectral-LoRA layer in a model, wrapped (DDP, PeftModel, …) or not."""
    return (module for module in model.modules() if isinstance(module, SpectralLoRALinear))


def magnitude_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The magnitudes m of every spectral-LoRA adapter in a model: what gets the ×ratio learning rate."""
    return [param for layer in spectral_lora_layers(model) for param in layer.spectral_lora_magnitude.values()]


class SpectralLoRAModel(LinearTuner):
    """The PEFT tuner for spectral-clamped LoRA; `get_peft_model(model, SpectralLoRAConfig(...))` builds it.

    It wraps the same transformer-block linears as POET by default (q, k, v, o, gate, up, down for LLaMA).
    """

    method = "Spectral LoRA"
    target_forms = "a list of names, a regex, or 'all-linear'"
    prefix = "spectral_lora_"
    tuner_layer_cls = SpectralLoRALinear
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _check_new_adapter_config(self, config: SpectralLoRAConfig) -> None:
        rewriting = [name for name, other in self.peft_config.items() if other.backbone != "pretrained"]
        if len(self.peft_config) > 1 and rewriting:
            raise ValueError(
                f"Spectral LoRA adapter {rewriting[0]!r} has backbone={self.peft_config[rewriting[0]].backbone!r}, "
                "which rewrites the base weights; a model with such an adapter takes no other. Use "
                "backbone='pretrained' for every adapter, or build a fresh model."
            )

    def initialize_injected(self, model: nn.Module, adapter_name: str) -> None:
        """Redraw or zero the backbone where the adapter says so, once every target has been wrapped."""
        for layer in spectral_lora_layers(model):
            if adapter_name in layer.spectral_lora_config:
                layer.initialize_backbone(adapter_name)
