"""Training helpers: merge-then-reinitialize, the spectral clamp, stable directions, parameter groups, callbacks."""

from .callback import POETCallback
from .clamp import SpectralClampCallback, clamp_spectral_norms
from .directions import StableDirections, summarize_directions
from .merge import MergeSchedule, merge_and_reinit, reset_optimizer_state
from .official_adamw import OfficialAdamW
from .param_groups import add_param_group, create_param_groups

__all__ = [
    "MergeSchedule",
    "OfficialAdamW",
    "POETCallback",
    "SpectralClampCallback",
    "StableDirections",
    "add_param_group",
    "clamp_spectral_norms",
    "create_param_groups",
    "merge_and_reinit",
    "reset_optimizer_state",
    "summarize_directions",
]
