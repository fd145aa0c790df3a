"""SpectralLoRALinear: a frozen Linear or Conv1D plus a low-rank branch m·(α/r)·B·A whose spectral norm is capped."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...guards import raise_if_nonfinite
from ...ops.initialization import random_projection
from ...ops.seeding import seeded_generator
from ...ops.spectral import low_rank_spectral_norm
from ...sharding import full_tensor
from ..linear import LinearWeightMixin
from .config import SpectralLoRAConfig


class SpectralLoRALinear(nn.Module, LinearWeightMixin, BaseTunerLayer):
    """y = W·x + b + m·(lora_alpha/r)·B·A·x, with W frozen and A, B, m trained.

    Per adapter: `spectral_lora_A` (r, in), `spectral_lora_B` (out, r), and `spectral_lora_magnitude`, shape (1,)
    or (out,), all float32 whatever the weight's dtype. B starts at zero, so the branch adds nothing until trained.
    """

    adapter_layer_names = ("spectral_lora_A", "spectral_lora_B", "spectral_lora_magnitude")
    other_param_names = ("spectral_lora_config", "spectral_lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SpectralLoRAConfig, layer_key: str):
        super().__init__()
        self.base_layer = base_layer
        self.layer_key = layer_key
        self._init_linear()
        self.spectral_lora_A = nn.ParameterDict()
        self.spectral_lora_B = nn.ParameterDict()
        self.spectral_lora_magnitude = nn.ParameterDict()
        self.spectral_lora_dropout = nn.ModuleDict()
        self.spectral_lora_config: dict[str, SpectralLoRAConfig] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: SpectralLoRAConfig) -> None:
        """Add an adapter: A drawn as LoRA draws it (Kaiming-uniform, from the seed), B = 0, m = 1."""
        if config.r > min(self.in_features, self.out_features):
            raise ValueError(
                f"Spectral LoRA cannot wrap {self.layer_key} with r={config.r}: its weight is "
                f"{self.out_features}×{self.in_features}. Valid: 1 ≤ r ≤ {min(self.in_features, self.out_features)}."
            )
        device = self.get_base_layer().weight.device
        generator = seeded_generator(config.seed, self.layer_key, adapter_name, "A")
        bound = 1 / math.sqrt(self.in_features)  # nn.init.kaiming_uniform_(a=√5), LoRA's init of A
        lora_a = (torch.rand(config.r, self.in_features, generator=generator) * 2 - 1) * bound
        rows = self.out_features if config.magnitude == "vector" else 1
        self.spectral_lora_config[adapter_name] = config
        self.spectral_lora_A[adapter_name] = nn.Parameter(lora_a.to(device))
        self.spectral_lora_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, config.r, device=device))
        self.spectral_lora_magnitude[adapter_name] = nn.Parameter(torch.ones(rows, device=device))
        self.spectral_lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        )
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def initialize_backbone(self, adapter_name: str) -> None:
        """Make the base weight what the adapter's `backbone` says: kept, redrawn N(0, 1/d_in) from the seed, or 0.

        A redrawn or zeroed backbone also gets a zero bias: the pretrained bias belongs to the pretrained weight.
        """
        config = self.spectral_lora_config[adapter_name]
        if config.backbone == "pretrained":
            return
        if config.backbone == "frozen_random":
            # float64 on a CPU generator, then cast and moved: the same backbone on every device, rank and reload.
            generator = seeded_generator(config.seed, self.layer_key, "backbone")
            weight = random_projection("gaussian", self.out_features, self.in_features, generator)
        else:
            weight = torch.zeros(self.out_features, self.in_features)
        self._write_logical_weight(weight)
        bias = self.get_base_layer().bias
        if bias is not None:
            bias.zero_()

    def _scaled_left(self, adapter_name: str) -> torch.Tensor:
        # m·(α/r)·B: the magnitude scales B's rows (or all of B), so ΔW = this @ A.
        config = self.spectral_lora_config[adapter_name]
        magnitude = self.spectral_lora_magnitude[adapter_name]
        return self.spectral_lora_B[adapter_name] * (magnitude.unsqueeze(1) * config.scaling)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = m·(lora_alpha/r)·B·A in the base layer's storage layout and dtype."""
        delta = self._scaled_left(adapter_name) @ self.spectral_lora_A[adapter_name]
        delta = delta.t() if self.fan_in_fan_out else delta
        return delta.to(self.get_base_layer().weight.dtype)

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight the layer applies now, in float64: the base weight plus each active, unmerged branch."""
        weight = self.logical_weight().double()
        if self.disable_adapters or self.merged:
            return weight
        for name in (name for name in self.active_adapters if name in self.spectral_lora_config):
            weight = weight + self._scaled_left(name).double() @ self.spectral_lora_A[name].double()
        return weight

    @torch.no_grad()
    def spectral_norm(self, adapter_name: str) -> float:
        """σ_max(ΔW), exactly, from the r×r factors of B and A; raises if the branch holds NaN or inf."""
        # Whole factors under FSDP2 (r rows or columns each), so that every rank clamps by the same σ.
        factors = (full_tensor(self._scaled_left(adapter_name)), full_tensor(self.spectral_lora_A[adapter_name]))
        if not all(torch.isfinite(factor).all() for factor in factors):
            raise ValueError(
                f"Spectral LoRA adapter {adapter_name!r} of {self.layer_key} has a non-finite branch (NaN or inf in "
                "A, B or m): training diverged before the clamp could act. Lower the learning rate or "
                "magnitude_lr_ratio."
            )
        return low_rank_spectral_norm(*factors).item()

    def spectral_bound(self, adapter_name: str) -> Optional[float]:
        """The cap c/√d_in on σ_max(ΔW), or None when the adapter has no clamp."""
        sigma_max = self.spectral_lora_config[adapter_name].sigma_max
        return None if sigma_max is None else sigma_max / math.sqrt(self.in_features)

    @torch.no_grad()
    def clamp_spectral_norm(self) -> float:
        """Scale each clamped branch back to σ_max(ΔW) = c/√d_in where it exceeds it; returns the largest σ/bound seen.

        A and B are both scaled by √(bound/σ), which keeps their norms balanced as LoRA's updates expect, and
        leaves m (and its fast learning rate) alone. A merged layer is left as it is: its branch is in the weight.
        """
        worst = 0.0
        for name in self.spectral_lora_config:
            bound = self.spectral_bound(name)
            if bound is None or name in self.merged_adapters:
                continue
            sigma = self.spectral_norm(name)
            worst = max(worst, sigma / bound)
            if sigma > bound:
                factor = math.sqrt(bound / sigma)
                self.spectral_lora_A[name].mul_(factor)
                self.spectral_lora_B[name].mul_(factor)
        return worst

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output plus each active branch m·(α/r)·B·A·x (computed in float32)."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.spectral_lora_config:
                continue
            lora_a = self.spectral_lora_A[name]
            hidden = self.spectral_lora_dropout[name](x.to(lora_a.dtype)) @ lora_a.t()
            result = result + (hidden @ self._scaled_left(name).t()).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active branches into the base weight; a NaN or inf result is refused, whatever safe_merge says."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.spectral_lora_config:
                continue
            delta = self.get_delta_weight(name)
            weight = self.get_base_layer().weight
            merged = weight.data + delta
            raise_if_nonfinite([(f"the merged weight of {self.layer_key} (adapter {name!r})", merged)], "to merge")
            with torch.no_grad():
                weight += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged branches from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self.get_base_layer().weight -= self.get_delta_weight(name)

    def __repr__(self) -> str:
        return "spectral_lora." + super().__repr__()
