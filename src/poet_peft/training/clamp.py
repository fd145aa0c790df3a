"""The spectral clamp of seed 002: after every optimizer step, σ_max(ΔW) ≤ c/√d_in in every spectral-LoRA layer."""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

from ..tuners.spectral_lora.model import spectral_lora_layers


def clamp_spectral_norms(model: nn.Module) -> float:
    """Clamp every spectral-LoRA branch to its bound; call right after `optimizer.step()` in an Accelerate loop.

    Returns the largest σ_max(ΔW)/bound seen before clamping (≤ 1 means nothing needed clamping; 0 without layers).
    """
    return max((layer.clamp_spectral_norm() for layer in spectral_lora_layers(model)), default=0.0)


class SpectralClampCallback(TrainerCallback):
    """Runs `clamp_spectral_norms` after every optimizer step of a transformers Trainer (before zero_grad)."""

    def __init__(self):
        self.last_ratio = 0.0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        """Clamp right after the step; keep the largest σ/bound seen before it in `last_ratio`."""
        self.last_ratio = clamp_spectral_norms(model)
