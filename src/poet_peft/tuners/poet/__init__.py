"""POET: W = R·W0·P with learned orthogonal R, P (arXiv 2506.08001)."""

from .config import POETConfig
from .layer import POETLinear
from .model import DEFAULT_TARGET_MODULES, POETModel, poet_layers, poet_parameters

__all__ = ["DEFAULT_TARGET_MODULES", "POETConfig", "POETLinear", "POETModel", "poet_layers", "poet_parameters"]
