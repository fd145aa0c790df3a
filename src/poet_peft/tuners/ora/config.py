"""ORAConfig: the settings of an ORA adapter, validated when it is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ...ops.initialization import PROJECTIONS
from ..config_checks import check_bool, normalize_module_names


@dataclass
class ORAConfig(PeftConfig):
    """Configuration of ORA (seed 003): the Q and K projections become fixed random orthogonal maps.

    Every other parameter of the model trains. Every field is documented in docs/ora.md.
    """

    init: Literal["orthogonal", "gaussian"] = field(
        default="orthogonal",
        metadata={"help": "'orthogonal' (Haar, rows orthonormal) or 'gaussian' (i.i.d. N(0, 1/d_in): ablation A1)."},
    )
    trainable_qk: bool = field(
        default=False, metadata={"help": "Train Q and K from the random init instead of freezing them (ablation A2)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the Q/K draws; the adapter stores it, not the matrices."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "The Q and K projections (suffix match) or a regex; None uses the architecture's default."},
    )
    fused_qkv_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Targets whose output is [Q; K; V] in equal thirds (GPT-2's c_attn): only Q and K are replaced. "
            "None uses the architecture's default."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex never to replace."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only replace Q/K in these layer indices (the others stay trainable)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers', 'h') for layers_to_transform."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.ORA
        normalize_module_names(self)
        if isinstance(self.fused_qkv_modules, str):
            self.fused_qkv_modules = [self.fused_qkv_modules]
        if self.init not in PROJECTIONS:
            raise ValueError(
                f"ORAConfig.init={self.init!r} is not an ORA initialisation; valid: "
                f"{', '.join(map(repr, PROJECTIONS))}."
            )
        check_bool(self, "trainable_qk")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"ORAConfig.seed={self.seed!r} must be an integer.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("ORAConfig.layers_pattern only applies together with layers_to_transform.")
