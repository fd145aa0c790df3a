"""Spectral-clamped LoRA (seed 002): a low-rank branch with a fast magnitude and a capped spectral norm."""

from .config import SpectralLoRAConfig
from .layer import SpectralLoRALinear
from .model import SpectralLoRAModel, magnitude_parameters, spectral_lora_layers

__all__ = [
    "SpectralLoRAConfig",
    "SpectralLoRALinear",
    "SpectralLoRAModel",
    "magnitude_parameters",
    "spectral_lora_layers",
]
