"""ORA: fixed random orthogonal Q/K projections, everything else trained (seed 003)."""

from .config import ORAConfig
from .layer import ORALinear
from .model import DEFAULT_TARGET_MODULES, ORAModel, ora_layers

__all__ = ["DEFAULT_TARGET_MODULES", "ORAConfig", "ORALinear", "ORAModel", "ora_layers"]
