"""SpectralLoRAConfig: the settings of a spectral-clamped LoRA adapter, validated when it is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..config_checks import check_number, normalize_module_names

MAGNITUDES = ("scalar", "vector")
BACKBONES = ("pretrained", "frozen_random", "zero")


@dataclass
class SpectralLoRAConfig(PeftConfig):
    """Configuration of spectral-clamped LoRA (seed 002): ΔW = m·(lora_alpha/r)·B·A beside a frozen backbone W.

    The magnitude m trains at a higher learning rate (`poet_peft.create_param_groups`), and after every optimizer
    step `poet_peft.clamp_spectral_norms` caps σ_max(ΔW) at sigma_max/√d_in. Every field is documented in
    docs/spectral-lora.md.
    """

    r: int = field(default=8, metadata={"help": "Rank of the branch (seed 002: 4 or 8)."})
    lora_alpha: float = field(default=8.0, metadata={"help": "The branch is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the branch's input."})
    magnitude: Literal["scalar", "vector"] = field(
        default="scalar",
        metadata={"help": "'scalar': one learned m per layer; 'vector': one per output row. Both start at 1."},
    )
    sigma_max: Optional[float] = field(
        default=0.7,
        metadata={"help": "Clamp constant c: σ_max(ΔW) ≤ c/√d_in after every step. None: no clamp."},
    )
    backbone: Literal["pretrained", "frozen_random", "zero"] = field(
        default="pretrained",
        metadata={
            "help": "'pretrained': W kept and frozen; 'frozen_random': W redrawn N(0, 1/d_in) from the seed and "
            "frozen (seed experiment #1); 'zero': W = 0, the branch alone (experiment #2)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the frozen_random backbone and of A's init."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match), a regex, or 'all-linear'; None: the architecture's default."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex never to wrap."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only wrap the targets in these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers', 'h') for layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. embeddings)."}
    )
    train_in_place: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Other modules to train in full in place, with no frozen copy beside them (unlike "
            "modules_to_save), and store in the adapter file, e.g. embeddings, norms and lm_head when pretraining."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SPECTRAL_LORA
        normalize_module_names(self)
        check_number(self, "lora_alpha")
        check_number(self, "lora_dropout")
        if self.sigma_max is not None:
            check_number(self, "sigma_max")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"SpectralLoRAConfig.r={self.r!r} must be an integer ≥ 1 (seed 002 uses 4 or 8).")
        if not self.lora_alpha > 0:
            raise ValueError(f"SpectralLoRAConfig.lora_alpha={self.lora_alpha!r} must be > 0.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"SpectralLoRAConfig.lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.magnitude not in MAGNITUDES:
            raise ValueError(
                f"SpectralLoRAConfig.magnitude={self.magnitude!r} is not valid; use "
                f"{' or '.join(map(repr, MAGNITUDES))}."
            )
        if self.sigma_max is not None and not self.sigma_max > 0:
            raise ValueError(
                f"SpectralLoRAConfig.sigma_max={self.sigma_max!r} must be > 0 (seed 002: 0.7), or None for no clamp."
            )
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"SpectralLoRAConfig.backbone={self.backbone!r} is not valid; use {', '.join(map(repr, BACKBONES))}."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"SpectralLoRAConfig.seed={self.seed!r} must be an integer.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("SpectralLoRAConfig.layers_pattern only applies together with layers_to_transform.")

    @property
    def scaling(self) -> float:
        """lora_alpha / r, the branch's fixed scale."""
        return self.lora_alpha / self.r
